"""16-bit pretraining of the MoE LM, cached by a hash of its (model, data, pretrain) config.

Sweep trials and concurrent runs share one checkpoint (ttha.cache): the first trains it and writes it as
safetensors with a checked JSON beside it, the others wait for it on a file lock and load it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ttha import cache, data
from ttha.config import ConfigError
from ttha.model import MoELM, cycled_bits, next_byte_loss, softmax_topk
from ttha.paths import outputs_root

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def progress_interval() -> float:
    """Refresh progress bars often on a terminal, rarely in a log file."""
    return 0.1 if sys.stderr.isatty() else 10.0


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cache_key(cfg) -> str:
    """Stable hash of everything that changes the trained weights."""
    pre = OmegaConf.to_container(cfg.pretrain, resolve=True)
    pre.pop("cache_dir", None)
    if not pre.get("expert_drop"):  # off: the key of checkpoints trained before the option existed
        pre.pop("expert_drop", None)
    pre.pop("expert_drop_bits", None), pre.pop("expert_drop_experts", None)
    hidden = droppable_experts(cfg)
    if pre.get("expert_drop") and hidden is not None:  # which experts, however they were named
        pre["expert_drop_experts"] = hidden
    pre["seed"] = pretrain_seed(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("dtype", None)  # the serving dtype: training is fp32 / autocast either way
    payload = {"model": model, "data": OmegaConf.to_container(cfg.data, resolve=True), "pretrain": pre}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_seed(cfg) -> int:
    """pretrain.seed, or the run's seed when it is null."""
    seed = cfg.pretrain.get("seed")
    return int(cfg.seed if seed is None else seed)


def cache_dir(cfg) -> Path:
    """pretrain.cache_dir, or cache/ under the outputs root: checkpoints and the corpus, shared by trials. Created
    here, so that a folder that cannot be (one os.access calls writable, like /proc for root) is a ConfigError
    naming the key, before the run records anything."""
    path = Path(str(cfg.pretrain.cache_dir)) if cfg.pretrain.get("cache_dir") else outputs_root() / "cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("pretrain.cache_dir", str(path), f"cannot create it ({err.strerror or err})") from None
    return path


@torch.no_grad()
def evaluate(model: MoELM, stream: torch.Tensor, batch_size: int, seq_len: int, n_batches: int,
             device: torch.device) -> float:
    """Perplexity on the first n_batches consecutive windows of a stream."""
    model.eval()
    nll, n = 0.0, 0
    for batch in data.stream_batches(stream, batch_size, seq_len, n_batches):
        batch = batch.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch[:, :-1])
        nll += float(next_byte_loss(logits, batch[:, 1:], reduction="sum"))
        n += batch[:, 1:].numel()
    return math.exp(nll / n)


def droppable_experts(cfg) -> list[int] | None:
    """The experts pretrain.expert_drop may hide: pretrain.expert_drop_experts, or those that cfg.experts.bits makes
    pretrain.expert_drop_bits bits (expert i gets bits[i % len(bits)], as quantize_experts does), or None (every
    expert) when both are null. Indices let a model trained to hide the 16-bit experts of one mix serve another."""
    if cfg.pretrain.get("expert_drop_experts") is not None:
        return sorted({int(i) for i in cfg.pretrain.expert_drop_experts})
    wanted = cfg.pretrain.get("expert_drop_bits")
    if wanted is None:
        return None
    wanted = {int(b) for b in wanted}
    return [i for i, b in enumerate(cycled_bits(cfg.experts.bits, int(cfg.model.n_experts))) if b in wanted]


class ExpertDrop:
    """Pretraining router that hides each expert from a sequence with probability p, in each layer.

    Serving steers tokens away from expensive experts (TTHA's bias) and the tokens land on their next choices; a
    model that learned with missing experts has next choices that serve them well, so steering costs less quality
    (and the model with every expert present some). Per sequence, not per token: a serving bias holds for a whole
    stream. A layer left with fewer than top_k experts keeps them all. experts: only these may be hidden (the ones
    serving will make expensive: the others are always there, so the gate keeps its use of every expert and the
    model learns to do without the expensive ones); None: every expert."""

    def __init__(self, p: float, n_layers: int, n_experts: int, top_k: int, gen: torch.Generator,
                 experts: list[int] | None = None):
        self.p, self.shape, self.k, self.gen = p, (n_layers, n_experts), top_k, gen
        self.may_hide = torch.zeros(n_experts, dtype=torch.bool)
        self.may_hide[slice(None) if experts is None else experts] = True
        self.hidden = None

    def draw(self, batch: int, seq: int, device: torch.device) -> None:
        hidden = (torch.rand((batch, *self.shape), generator=self.gen) < self.p) & self.may_hide
        hidden &= (~hidden).sum(-1, keepdim=True) >= self.k  # too few left: that layer keeps all its experts
        self.hidden = hidden.to(device).repeat_interleave(seq, 0)  # [batch * seq, layers, experts]

    def __call__(self, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_topk(logits.masked_fill(self.hidden[:, layer], float("-inf")), self.k)


def train(cfg, corpus: data.Corpus, device: torch.device) -> tuple[MoELM, float]:
    p = cfg.pretrain
    seed = pretrain_seed(cfg)
    torch.manual_seed(seed)
    model = MoELM(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(p.lr), weight_decay=float(p.weight_decay),
                            betas=(0.9, 0.95))
    steps, warm = int(p.steps), int(p.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    drop = None
    if float(p.expert_drop) > 0:
        drop = ExpertDrop(float(p.expert_drop), len(model.moe_layers), model.n_experts, model.moe_layers[0].top_k,
                          torch.Generator().manual_seed(seed + 1), droppable_experts(cfg))
        model.set_router(drop)
    model.train()
    loss_ema = None
    bar = tqdm(range(steps), desc="pretraining", unit="step", dynamic_ncols=True, mininterval=progress_interval())
    for _ in bar:
        batch = data.random_batch(corpus.train, int(p.batch_size), int(p.seq_len), gen).to(device)
        if drop is not None:
            drop.draw(batch.shape[0], batch.shape[1] - 1, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch[:, :-1])
        loss = next_byte_loss(logits, batch[:, 1:])
        total = loss + float(p.aux_loss_weight) * model.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    model.set_router(None)
    return model, loss_ema


def load_or_train(cfg, device: torch.device, corpus: data.Corpus | None = None) -> tuple[MoELM, dict]:
    """The pretrained 16-bit model on `device` in the serving dtype, and what is known about it.

    Cached by cache_key (ttha.cache: safetensors weights, a JSON of the config and metrics with their sha256,
    a file lock so that concurrent runs of one key pretrain once); a damaged entry, or one whose test perplexity
    is not finite, is rebuilt."""
    t0 = time.perf_counter()
    key = cache_key(cfg)
    stem = cache_dir(cfg) / f"moe-{key}"

    def build() -> tuple[dict, dict]:
        nonlocal corpus
        corpus = corpus if corpus is not None else data.cached_corpus(cfg.data, cache_dir(cfg))
        model, final_loss = train(cfg, corpus, device)
        b = min(int(cfg.pretrain.batch_size), 16)
        info = {"final_loss": final_loss,
                "test_perplexity": evaluate(model, corpus.test, b, int(cfg.pretrain.seq_len),
                                            int(cfg.pretrain.eval_batches), device),
                "unigram_perplexity": data.unigram_perplexity(corpus.test)}
        if not math.isfinite(info["test_perplexity"]):  # a diverged model is never cached, nor served
            raise ConfigError("pretrain.lr", cfg.pretrain.lr,
                              f"pretraining diverged (test perplexity {info['test_perplexity']}); lower it")
        return model.state_dict(), {"key": key, "info": info}

    def check(state: dict, meta: dict) -> None:
        info = meta.get("info")
        if meta.get("key") != key or not isinstance(info, dict):
            raise cache.Damaged("metadata of another model")
        if not all(isinstance(info.get(k), (int, float)) and math.isfinite(info[k])
                   for k in ("final_loss", "test_perplexity", "unigram_perplexity")):
            raise cache.Damaged(f"test perplexity {info.get('test_perplexity')} is not finite")

    state, meta, cached = cache.get_or_build(stem, build, "pretraining", check)
    model = MoELM(cfg.model)
    model.load_state_dict(state)
    info = dict(meta["info"], cached=cached)
    path = cache.tensors_path(stem)
    if cached:
        log.info("pretrained model loaded from cache %s", path)
    else:
        log.info("pretrained model cached at %s (test ppl %.2f, byte-unigram ppl %.2f)", path,
                 info["test_perplexity"], info["unigram_perplexity"])
    model = model.to(device=device, dtype=model_dtype(cfg.model.dtype, device))
    info.update(cache_path=str(path), seconds=time.perf_counter() - t0)
    return model, info
