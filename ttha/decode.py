"""The KV-cache decode step of MoELM: B streams, one token each per step, each at its own position.

A step: embedding -> per layer (attention of the new token against the layer's KV cache, router, MoE) -> head.
The cache is preallocated, [layers, B, heads, max_seq_len, head_dim] for keys and for values; stream b writes
its key and value at positions[b] and attends to positions 0..positions[b]. A stream that reaches its end
restarts at position 0 on its next sequence: what its old sequence left beyond the new position is masked,
so nothing is cleared and the other streams are untouched.

Routing: top-k of softmax(gate logits + bias) (AdaptiveRouter's rule), with `bias` a device tensor [E] that
callers write in place between steps; each step leaves its gate logits [L, B, E] and per-expert token counts
[L, E] in place for the router's records (usage, TTHA loss). The MoE runs through ttha.kernels: topk_router(...,
return_plan=True), then moe_decode over the layer's experts stacked as a GroupedExperts (16-bit, int4, int2):
on CUDA the grouped Triton kernels read only the routed experts' weights, with no host sync, so the whole step
is captured once as a CUDA graph and replayed, a changing bias included. Elsewhere the torch reference runs
the same plan. An fp32 model (the CPU default) or fp8 experts run the plan through the model's own expert
modules instead (the grouped stacks are 16-bit): same routing, same semantics, eager only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ttha import kernels
from ttha.kernels import moe as kmoe
from ttha.kernels import quant
from ttha.model import MoEFFN, MoELM, SimpleExpert, cycled_bits, next_byte_loss

GROUPED_BITS = (16, 4, 2)  # what a GroupedExperts stacks
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _bytes_per_value(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    raise ValueError(f"dtype={dtype!r}: must be a torch.dtype or one of {sorted(DTYPE_BYTES)}")


def kv_cache_bytes(model_cfg, batch_size: int, dtype="bf16", seq_len: int | None = None) -> int:
    """Bytes of the decode step's KV cache (keys and values, every layer) for `batch_size` streams of up to
    `seq_len` tokens (default model.max_seq_len), in `dtype` (the model's serving dtype)."""
    s = int(model_cfg.max_seq_len if seq_len is None else seq_len)
    return 2 * int(model_cfg.n_layers) * int(batch_size) * s * int(model_cfg.d_model) * _bytes_per_value(dtype)


def _weight_bytes(n: int, k: int, bits: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes of one [n, k] expert weight as stored: 16-bit values, or packed codes in whole TILE_ROWS blocks plus
    fp16 scales and mins per group (kernels.quant)."""
    if bits == 16:
        return n * k * dtype_bytes
    rows = -(-n // quant.TILE_ROWS) * quant.TILE_ROWS
    return rows * k * bits // 8 + 2 * 2 * (k // group_size) * n


def step_bytes(model_cfg, batch_size: int, bits: Sequence[int] = (16,), group_size: int = 64, dtype="bf16",
               seq_len: int | None = None) -> dict[str, float]:
    """What one decode step reads, in bytes, by kind: 'experts' (expected, see below), 'attention' (qkv and
    output projections), 'kv_cache' (the whole cache is read: the step's shapes are static), 'other' (gates,
    norms, the head, the B embedding rows). Expert i has the bits quantize_experts assigns it (cycled_bits).
    An expert costs one read of its weights if it gets a token: under uniform routing it gets none with
    probability (1 - k/E)^B, so its bytes count with weight 1 - (1 - k/E)^B."""
    d, f, e, k = int(model_cfg.d_model), int(model_cfg.d_ff), int(model_cfg.n_experts), int(model_cfg.top_k)
    layers, b, v = int(model_cfg.n_layers), int(batch_size), int(model_cfg.vocab_size)
    size = _bytes_per_value(dtype)
    active = 1.0 - (1.0 - k / e) ** b
    experts = sum(_weight_bytes(f, d, bi, group_size, size) + _weight_bytes(d, f, bi, group_size, size)
                  for bi in cycled_bits(bits, e))
    return {"experts": layers * active * experts, "attention": layers * 4 * d * d * size,
            "kv_cache": float(kv_cache_bytes(model_cfg, b, dtype, seq_len)),
            "other": (layers * (e * d + 4 * d) + v * d + 2 * b * d + 2 * d) * size}


def expert_byte_share(model_cfg, batch_size: int, bits: Sequence[int] = (16,), group_size: int = 64,
                      dtype="bf16", seq_len: int | None = None) -> float:
    """Share of the bytes a decode step reads that are expert weights (step_bytes)."""
    parts = step_bytes(model_cfg, batch_size, bits, group_size, dtype, seq_len)
    return parts["experts"] / sum(parts.values())


def grouped_experts(layer: MoEFFN) -> kmoe.GroupedExperts | None:
    """The layer's experts stacked per precision, or None when it has one the stacks cannot hold (fp8) or the
    model is not 16-bit (the grouped kernels compute in the 16-bit dtype, quantized experts too). The model's
    experts become views of the stacks: no second copy of the weights, and test-time training, which updates
    them in place, updates what the decode step reads."""
    experts = list(layer.experts)
    if any(getattr(ex, "bits", None) not in GROUPED_BITS for ex in experts):
        return None
    if layer.gate.weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    parts = [(ex.w1.weight.detach(), ex.w2.weight.detach()) if isinstance(ex, SimpleExpert)
             else (ex.qweight("w1"), ex.qweight("w2")) for ex in experts]
    stacked = kmoe.GroupedExperts.from_parts(parts)
    for e, ex in enumerate(experts):
        for name, side in (("w1", "up"), ("w2", "down")):
            w = stacked.weight(e, side)
            if isinstance(ex, SimpleExpert):
                getattr(ex, name).weight.data = w
            else:
                setattr(ex, f"{name}_packed", w.packed)
                setattr(ex, f"{name}_scales", w.scales)
                setattr(ex, f"{name}_mins", w.mins)
    return stacked


def _moe_through_modules(layer: MoEFFN, x: torch.Tensor, weights: torch.Tensor, plan) -> torch.Tensor:
    """moe_decode_ref's semantics with the layer's own expert modules: each expert with tokens (the plan, read on
    the host) runs its slots' rows; out[t] = sum_j weights[t, j] * y[t * k + j] in fp32, in x's dtype."""
    t, d = x.shape
    k = weights.shape[1]
    y = torch.zeros((t * k, d), dtype=torch.float32, device=x.device)
    offsets = plan.offsets.tolist()
    for e, expert in enumerate(layer.experts):
        if offsets[e] != offsets[e + 1]:
            slots = plan.order[offsets[e]:offsets[e + 1]].long()
            y[slots] = expert(x[slots // k]).float()
    return (weights.float().unsqueeze(-1) * y.view(t, k, d)).sum(1).to(x.dtype)


class Decoder:
    """The decode step of `model` for `batch_size` streams with a KV cache of `max_seq_len` positions (default
    the model's). Build it once the model is on its device and in its serving dtype (its experts are quantized
    and then stacked here). graph: capture the step as a CUDA graph (None: where it can be, on CUDA with the
    grouped kernels). step(tokens, positions) -> next-token logits [B, vocab] fp32.

    steps > 1: run() decodes that many steps in one go, one graph replay (vLLM's multi-step scheduling): the
    host's work per replay (inputs, bias, reading the results) is shared by the steps, so a small model's step
    is bound by the GPU rather than by Python. The bias holds for the replay's steps; routing stays per token.

    Static device tensors, valid after a step (or run) until the next: logits [B, V] and gate_logits [L, B, E]
    fp32 of the last step, step_counts [steps, L, E] int32 (tokens routed to each expert; counts: the last
    step's), nll [steps] (each step's next-token NLL summed over the streams, against run()'s targets). `bias`
    [E] fp32 is read by every step: write it in place (set_bias), never rebind it (a captured graph holds its
    address)."""

    def __init__(self, model: MoELM, batch_size: int, max_seq_len: int | None = None, graph: bool | None = None,
                 steps: int = 1):
        for name, v in (("batch_size", batch_size), ("steps", steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an int >= 1")
        s = model.max_seq_len if max_seq_len is None else max_seq_len
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= model.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len!r}: must be an int in [1, model.max_seq_len="
                             f"{model.max_seq_len}]")
        self.model = model
        param = model.tok.weight
        self.device, self.dtype = param.device, param.dtype
        self.batch_size, self.max_seq_len, self.steps = batch_size, s, steps
        block = model.blocks[0]
        self.n_layers, self.n_heads = len(model.blocks), block.n_heads
        self.d_model = model.tok.weight.shape[1]
        self.head_dim = self.d_model // self.n_heads
        self.top_k, self.n_experts = block.moe.top_k, model.n_experts
        dev, b, layers = self.device, batch_size, self.n_layers
        cache = (layers, b, self.n_heads, s, self.head_dim)
        self.k_cache = torch.zeros(cache, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros(cache, dtype=self.dtype, device=dev)
        self.bias = torch.zeros(self.n_experts, dtype=torch.float32, device=dev)
        self.tokens, self.positions, self.targets = (torch.zeros((steps, b), dtype=torch.long, device=dev)
                                                     for _ in range(3))
        self.logits = torch.zeros((b, model.vocab_size), dtype=torch.float32, device=dev)
        self.nll = torch.zeros(steps, dtype=torch.float32, device=dev)
        self.gate_logits = torch.zeros((layers, b, self.n_experts), dtype=torch.float32, device=dev)
        self.step_counts = torch.zeros((steps, layers, self.n_experts), dtype=torch.int32, device=dev)
        self.counts = self.step_counts[-1]
        self._rows = torch.arange(b, device=dev)
        self._cols = torch.arange(s, device=dev)
        stacks = [grouped_experts(layer) for layer in model.moe_layers]
        self.experts = stacks if all(g is not None for g in stacks) else None
        why = self._why_no_graph()
        if graph and why:
            raise ValueError(f"graph=True: {why}")
        self.graphed = why is None if graph is None else bool(graph)
        self._graph = None
        self.captures = 0  # how many times the step was captured (once, however the bias changes)

    def _why_no_graph(self) -> str | None:
        if self.device.type != "cuda" or not kernels.use_triton(self.device):
            return f"a CUDA graph needs the Triton kernels on CUDA (model on {self.device}, kernels " \
                   f"backend {kernels.get_backend()})"
        if self.experts is None:
            return "the experts must be 16-bit (bf16/fp16), int4 or int2 to be stacked for the grouped kernels"
        if not all(kmoe.kernel_supports(g) for g in self.experts):
            return f"the grouped kernels do not take group_size={self.experts[0].group_size} with these bits"
        return None

    @property
    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in (self.k_cache, self.v_cache))

    # ---- inputs --------------------------------------------------------------------------------------------
    def _host_to_device(self, values: torch.Tensor) -> torch.Tensor:
        """A fresh pinned copy per call, queued: the host never waits for the GPU, and no buffer is reused
        before its copy ran (the caching host allocator holds it until then). Contiguous first: pinned as is, an
        expanded view keeps its zero strides, and the device copy would write one element from several."""
        if self.device.type != "cuda":
            return values
        return values.contiguous().pin_memory().to(self.device, non_blocking=True)

    def set_bias(self, values) -> None:
        """Write the router bias [E] in place (it takes effect at the next step; a graph is not recaptured)."""
        v = torch.as_tensor(values, dtype=torch.float32)
        if tuple(v.shape) != (self.n_experts,):
            raise ValueError(f"bias: expected shape ({self.n_experts},), got {tuple(v.shape)}")
        self.bias.copy_(self._host_to_device(v) if v.device.type == "cpu" else v, non_blocking=True)

    def load(self, tokens, positions, targets=None) -> None:
        """Write the inputs into the static buffers: tokens, targets [steps, B] (host or device; [B] when steps
        is 1) and positions (host: checked here, 0 <= p < max_seq_len; position 0 starts a stream's next
        sequence). Targets (the next tokens) only score the steps (nll); None leaves the last ones."""
        pos = self._checked("positions", positions)
        if pos.device.type != "cpu":
            raise ValueError(f"positions: expected on the host, got {pos.device}")
        if int(pos.min()) < 0 or int(pos.max()) >= self.max_seq_len:
            raise ValueError(f"positions: {pos.tolist()} must lie in [0, max_seq_len={self.max_seq_len})")
        self.positions.copy_(self._host_to_device(pos.long()), non_blocking=True)
        for name, values in (("tokens", tokens), ("targets", targets)):
            if values is None:
                continue
            tok = self._checked(name, values)
            if tok.device.type == "cpu":
                if int(tok.min()) < 0 or int(tok.max()) >= self.model.vocab_size:
                    raise ValueError(f"{name}: {tok.tolist()} must lie in [0, vocab_size={self.model.vocab_size})")
                tok = self._host_to_device(tok.long())
            getattr(self, name).copy_(tok, non_blocking=True)

    def _checked(self, name: str, values) -> torch.Tensor:
        """values as integers [steps, B] (given so, or [B] when steps is 1), else a ValueError naming them."""
        v = torch.as_tensor(values)
        shape = (self.steps, self.batch_size)
        if v.dtype.is_floating_point or v.dtype == torch.bool or not (
                tuple(v.shape) == shape or (self.steps == 1 and tuple(v.shape) == shape[1:])):
            raise ValueError(f"{name}: expected {self.batch_size} integers a step ({self.steps} steps), got "
                             f"{v.dtype} {tuple(v.shape)}")
        return v.reshape(shape)

    def step(self, tokens, positions) -> torch.Tensor:
        """One decode step: the next-token logits [B, vocab] fp32 of each stream (the static `logits` tensor)."""
        if self.steps != 1:
            raise ValueError(f"step: this decoder runs steps={self.steps} at a time: call run()")
        self.run(tokens, positions)
        return self.logits

    def run(self, tokens, positions, targets=None) -> torch.Tensor:
        """`steps` decode steps (tokens, positions, targets as load() takes them), one graph replay where the
        step is captured. Returns nll [steps] (the static tensor; queued, not read: the host does not wait)."""
        self.load(tokens, positions, targets)
        if self.graphed:
            if self._graph is None:
                self.capture()
            self._graph.replay()
        else:
            self.compute()
        return self.nll

    def capture(self) -> None:
        """Capture the step on the loaded inputs as a CUDA graph, after eager runs (kernel autotuning cannot run
        in a capture). They recompute the loaded step: the cache entries they write are the ones it writes."""
        from ttha.kernels.tuning import capture

        self._graph = capture(lambda _: self.compute(), [None])
        self.captures += 1

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self) -> None:
        """The loaded steps, eagerly (what the graph replays). Teacher forcing makes every step's input known
        when the replay starts, so the embedding lookups and attention masks of all its steps are launched once,
        not once a step: small launches whose time a step pays whatever their size."""
        m = self.model
        x = m.tok(self.tokens) + m.pos(self.positions)  # [steps, B, D]
        masks = (self._cols <= self.positions[..., None])[:, :, None, None, :]  # [steps, B, 1, 1, S]
        for i in range(self.steps):
            self._step(i, x[i], masks[i])

    def _step(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        m, positions = self.model, self.positions[i]
        for layer, block in enumerate(m.blocks):
            x = x + self._attend(layer, block, block.ln1(x), positions, mask)
            x = x + self._moe(layer, block.moe, block.ln2(x), self.step_counts[i, layer])
        self.logits.copy_(m.head(m.ln_f(x)))
        self.nll[i] = next_byte_loss(self.logits, self.targets[i], reduction="sum")  # as the batch workloads score

    def _attend(self, layer: int, block, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        b = self.batch_size
        q, k, v = block.qkv(h).view(b, 3, self.n_heads, self.head_dim).unbind(1)
        keys, values = self.k_cache[layer], self.v_cache[layer]  # [B, H, S, hd]
        keys[self._rows, :, positions] = k
        values[self._rows, :, positions] = v
        att = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask)  # [B, H, 1, hd]
        return block.proj(att.reshape(b, self.d_model))

    def _moe(self, layer: int, moe: MoEFFN, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        logits = moe.gate(h).float()
        weights, _, plan = kernels.topk_router(logits, self.bias, self.top_k, return_plan=True)
        self.gate_logits[layer].copy_(logits)
        counts.copy_(plan.counts)
        if self.experts is not None:
            return kernels.moe_decode(h, weights, plan, self.experts[layer])
        return _moe_through_modules(moe, h, weights, plan)




# ---- benchmark (GPU): python -m ttha.decode --bench ------------------------------------------------------------
def bench(model: str = "decode", batch_size: int = 16, bits: Sequence[int] = (16, 4, 2), group_size: int = 64,
          steps: int = 50) -> list[dict]:
    """GPU time per decode step of conf/model/<model>.yaml (random weights: timing only), experts bits[i %
    len(bits)]: the captured step replayed back to back, and the same step run eagerly, both between CUDA
    events; with a zero bias (tokens on every expert) and with a bias that keeps them off the 16-bit experts."""
    from omegaconf import OmegaConf

    from ttha.model import quantize_experts
    from ttha.paths import conf_dir

    cfg = OmegaConf.load(conf_dir() / "model" / f"{model}.yaml")
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = MoELM(cfg)
    lm = quantize_experts(lm.to(torch.bfloat16), list(bits), group_size).eval()
    dec = Decoder(lm, batch_size, graph=True)
    tokens = torch.randint(0, lm.vocab_size, (batch_size,))
    dec.step(tokens, [b % dec.max_seq_len for b in range(batch_size)])  # captures

    def gpu_us(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / steps

    sixteen = [e for e, b in enumerate(dec.experts[0].bits) if b == 16]
    rows = []
    for name, off in (("all experts", []), ("no 16-bit experts", sixteen)):
        bias = torch.zeros(dec.n_experts)
        bias[off] = -1e4
        dec.set_bias(bias)
        graph_us, eager_us = gpu_us(dec._graph.replay), gpu_us(dec.compute)
        rows.append({"routing": name, "graph_us": graph_us, "eager_us": eager_us, "speedup": eager_us / graph_us,
                     "experts_reached": int((dec.counts > 0).sum()) / dec.n_layers})
    share = expert_byte_share(cfg, batch_size, bits, group_size)
    print(f"model={model} batch={batch_size} bits={list(bits)} expert byte share {share:.1%} "
          f"({torch.cuda.get_device_name()}); captures: {dec.captures}")
    for r in rows:
        print(f"{r['routing']:>18}: graph {r['graph_us']:8.1f} us  eager {r['eager_us']:8.1f} us  "
              f"x{r['speedup']:.2f}  experts reached a layer {r['experts_reached']:.1f}")
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Time the captured decode step against the same step run eagerly.")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--model", default="decode")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bits", default="16,4,2")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    bench(a.model, a.batch, [int(b) for b in a.bits.split(",")], steps=a.steps)
