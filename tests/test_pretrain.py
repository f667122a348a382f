"""Pretraining: the tiny model really learns; its cache is keyed by what changes the weights, never runs code,
rebuilds a damaged entry with one warning, and is built once by concurrent runs of one key."""
import json
import logging
import math
import os
import threading
from pathlib import Path

import pytest
import torch

from ttha import cache, data, model as model_mod, pretrain
from ttha.config import ConfigError

CPU = torch.device("cpu")
# A model and a pretraining small enough that building a cache entry is cheap.
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.n_experts=2",
         "model.top_k=1", "model.max_seq_len=32", "pretrain.steps=2", "pretrain.warmup_steps=1",
         "pretrain.batch_size=2", "pretrain.seq_len=16", "pretrain.eval_batches=1"]


@pytest.fixture
def small(compose_cfg, tmp_path):
    """A small model's config, its corpus a few text files, its cache under tmp_path/cache."""
    for pkg in ("a", "b", "c"):
        (tmp_path / "texts" / pkg).mkdir(parents=True)
        (tmp_path / "texts" / pkg / "m.txt").write_text(f"{pkg} = {pkg!r} * 3\n" * 40)
    return compose_cfg(*SMALL, f"data.corpus_dir={tmp_path / 'texts'}", f"pretrain.cache_dir={tmp_path / 'cache'}")


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _damage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]


@pytest.mark.slow
def test_default_tiny_model_beats_half_the_unigram_perplexity_and_is_cached(compose_cfg, tmp_path):
    cfg = compose_cfg(f"pretrain.cache_dir={tmp_path}")  # the default run's model and pretraining
    model, info = pretrain.load_or_train(cfg, CPU)
    assert not info["cached"]
    assert info["test_perplexity"] <= 0.5 * info["unigram_perplexity"], info
    again, info2 = pretrain.load_or_train(cfg, CPU)
    assert info2["cached"] and info2["cache_path"] == info["cache_path"]
    assert info2["test_perplexity"] == info["test_perplexity"]
    assert _same_weights(model, again)


def test_cache_key_follows_what_changes_the_weights(compose_cfg, tmp_path):
    def key(*overrides):
        return pretrain.cache_key(compose_cfg(f"pretrain.cache_dir={tmp_path}", *overrides))

    base = key()
    assert key("pretrain.steps=7") != base
    assert key("model.d_model=64") != base
    assert key("seed=3") != base
    assert key("seed=3", "pretrain.seed=0") == base  # a fixed pretrain.seed shares one model across seeds
    assert key("pretrain.expert_drop=0.1") != base
    assert key("~pretrain.expert_drop") == base  # off keeps the key of checkpoints from before the option
    only_16 = key("pretrain.expert_drop=0.1", "pretrain.expert_drop_bits=[16]")
    assert only_16 not in (base, key("pretrain.expert_drop=0.1"))
    assert key("pretrain.expert_drop_bits=[16]") == base  # no drop: nothing to restrict
    # the experts it may hide make the key, not the bits: another mix hides other experts
    assert key("pretrain.expert_drop=0.1", "pretrain.expert_drop_bits=[16]", "experts.bits=[4,16,2]") != only_16
    assert key("pretrain.expert_drop=0.1", "pretrain.expert_drop_bits=[16]", "experts.bits=[16,4,2,16,4,2]") == only_16
    # named by index, the same model serves another mix (the all-int2 bound of a model that hides mixed's 16-bit ones)
    assert key("pretrain.expert_drop=0.1", "pretrain.expert_drop_experts=[3,0]", "experts=int2") == only_16
    assert key("pretrain.expert_drop_experts=[0,3]") == base
    # serving choices and where the cache lives do not retrain
    assert key(f"pretrain.cache_dir={tmp_path / 'elsewhere'}", "experts=int2", "router=static",
               "model.dtype=bf16") == base


def test_expert_drop_hides_whole_sequences_from_experts_and_keeps_top_k():
    """Each (sequence, layer) hides each expert with probability p, the same at every position; routing never
    picks a hidden expert; a layer left with fewer than top_k keeps them all."""
    layers, experts, k, batch, seq = 2, 4, 2, 400, 3
    drop = pretrain.ExpertDrop(0.3, layers, experts, k, torch.Generator().manual_seed(0))
    drop.draw(batch, seq, CPU)
    hidden = drop.hidden.view(batch, seq, layers, experts)
    assert torch.equal(hidden, hidden[:, :1].expand_as(hidden))  # per sequence, not per token
    visible = (~hidden[:, 0]).sum(-1)
    assert int(visible.min()) >= k and int(visible.max()) == experts
    # an expert is hidden where h <= experts - k of the layer's experts are: E[h 1(h <= 2)] / experts
    binom = [math.comb(experts, h) * 0.3 ** h * 0.7 ** (experts - h) for h in range(experts + 1)]
    expected = sum(h * binom[h] for h in range(experts - k + 1)) / experts
    assert float(hidden[:, 0].float().mean()) == pytest.approx(expected, abs=0.03)
    logits = torch.zeros(batch * seq, experts)
    for layer in range(layers):
        weights, indices = drop(logits, layer)
        assert not drop.hidden[:, layer].gather(1, indices).any()
        assert torch.allclose(weights.sum(-1), torch.ones(batch * seq))


def test_expert_drop_bits_hides_only_the_experts_the_mix_makes_that_precision(compose_cfg):
    """experts=mixed gives expert i bits[i % 3]: [16] lets the drop hide experts 0, 3, 6 of 8 and no other."""
    cfg = compose_cfg("model.n_experts=8", "experts=mixed", "pretrain.expert_drop_bits=[16]")
    assert pretrain.droppable_experts(cfg) == [0, 3, 6]
    cfg.pretrain.expert_drop_bits = [4, 2]
    assert pretrain.droppable_experts(cfg) == [1, 2, 4, 5, 7]
    cfg.pretrain.expert_drop_bits = None
    assert pretrain.droppable_experts(cfg) is None
    cfg.pretrain.expert_drop_experts = [6, 0, 3]  # by index: whatever the mix
    assert pretrain.droppable_experts(cfg) == [0, 3, 6]
    batch, seq = 2000, 2
    drop = pretrain.ExpertDrop(0.4, 2, 8, 2, torch.Generator().manual_seed(0), [0, 3, 6])
    drop.draw(batch, seq, CPU)
    rate = drop.hidden.view(batch, seq, 2, 8)[:, 0].float().mean((0, 1))
    assert torch.all(rate[[1, 2, 4, 5, 7]] == 0)
    assert rate[[0, 3, 6]].tolist() == pytest.approx([0.4] * 3, abs=0.03)  # 5 always visible >= top_k: no cap


def test_pretraining_with_expert_drop_trains_another_model_and_serves_with_every_expert(small):
    """The drop is pretraining's alone: the model it returns routes over every expert (no router left set)."""
    corpus = data.cached_corpus(small.data, pretrain.cache_dir(small))
    plain, _ = pretrain.train(small, corpus, CPU)
    small.pretrain.expert_drop = 0.5
    dropped, _ = pretrain.train(small, corpus, CPU)
    assert all(m.router is None for m in dropped.moe_layers)
    assert not _same_weights(plain, dropped)


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_a_cache_dir_that_cannot_be_created_is_a_config_error_naming_the_key(compose_cfg, tmp_path, where):
    """Even where os.access says the nearest folder is writable (root and /proc), before any run is recorded."""
    if where == "/proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "cache" if where == "under a file" else Path("/proc/ttha-cache")
    cfg = compose_cfg(f"pretrain.cache_dir={folder}")
    with pytest.raises(ConfigError) as err:
        pretrain.cache_dir(cfg)
    assert str(err.value).startswith(f"pretrain.cache_dir='{folder}': cannot create it (")


def test_cache_is_safetensors_with_a_checked_json_and_loads_the_same_model(small, tmp_path):
    model, info = pretrain.load_or_train(small, CPU)
    stem = tmp_path / "cache" / f"moe-{pretrain.cache_key(small)}"
    assert info["cache_path"] == str(stem) + ".safetensors" and not info["cached"]
    record = json.loads(Path(f"{stem}.json").read_text())
    assert len(record["sha256"]) == 64 and record["meta"]["info"]["test_perplexity"] == info["test_perplexity"]
    assert not list((tmp_path / "cache").glob("*.pt"))  # no pickle written anywhere
    again, info2 = pretrain.load_or_train(small, CPU)
    assert info2["cached"] and _same_weights(model, again)
    assert again.head.weight.data_ptr() == again.tok.weight.data_ptr()  # tied embeddings stay tied


def test_a_crafted_pickle_in_the_cache_never_runs(small, tmp_path):
    """A .pt whose unpickling calls os.system, where the old cache (and a careless loader) would read it."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    stem = tmp_path / "cache" / f"moe-{pretrain.cache_key(small)}"
    stem.parent.mkdir(parents=True)
    for path in (Path(f"{stem}.pt"), cache.tensors_path(stem)):
        torch.save({"model": Payload(), "info": Payload()}, path)
    model, info = pretrain.load_or_train(small, CPU)
    assert not marker.exists()
    assert not info["cached"] and isinstance(model, model_mod.MoELM)  # rebuilt instead


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_start(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def _garble_middle(path: Path) -> None:
    """Flip bytes inside the weights: the file still parses, only its hash tells."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))


def _nan_perplexity(path: Path) -> None:
    meta = Path(str(path).replace(".safetensors", ".json"))
    record = json.loads(meta.read_text())
    record["meta"]["info"]["test_perplexity"] = float("nan")
    meta.write_text(json.dumps(record))


def _garble_json(path: Path) -> None:
    Path(str(path).replace(".safetensors", ".json")).write_text('{"format": 1, "sha2')


@pytest.mark.parametrize("damage", [_truncate, _garble_start, _garble_middle, _nan_perplexity, _garble_json])
def test_a_damaged_cache_is_rebuilt_with_one_warning(small, damage, caplog):
    model, info = pretrain.load_or_train(small, CPU)
    damage(Path(info["cache_path"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rebuilt, info2 = pretrain.load_or_train(small, CPU)
    assert len(_damage_lines(caplog)) == 1, caplog.text
    assert not info2["cached"] and info2["test_perplexity"] == info["test_perplexity"]
    assert _same_weights(model, rebuilt)  # same seed, same model
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, info3 = pretrain.load_or_train(small, CPU)
    assert info3["cached"] and not _damage_lines(caplog)  # the rebuilt entry is good


def test_a_diverged_pretraining_is_refused_and_not_cached(small, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "evaluate", lambda *a, **k: float("nan"))
    with pytest.raises(ConfigError, match="pretrain.lr=.*diverged"):
        pretrain.load_or_train(small, CPU)
    assert not list((tmp_path / "cache").glob("moe-*.json"))


def test_concurrent_runs_of_one_key_pretrain_once(small, monkeypatch):
    """Four callers at once: one trains, the others wait on the entry's lock and load its result."""
    real_train, trained, started = pretrain.train, [], threading.Barrier(4)

    def train(*args, **kwargs):
        trained.append(threading.get_ident())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train", train)
    results, errors = [], []

    def run():
        started.wait()
        try:
            results.append(pretrain.load_or_train(small, CPU))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert len(trained) == 1
    assert sorted(info["cached"] for _, info in results) == [False, True, True, True]
    first = results[0][0]
    assert all(_same_weights(first, m) for m, _ in results[1:])


def test_quantized_experts_cost_quality_in_proportion_to_bits():
    """Post-training quantization of a trained-like expert: 2-bit errs more than 4-bit, which errs more
    than fp8; the module output tracks the dequantized reference."""
    torch.manual_seed(0)
    dense = model_mod.SimpleExpert(64, 128)
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref = dense(x)
        err = {}
        for bits in (8, 4, 2):
            expert = model_mod.make_expert(dense, bits, 32)
            err[bits] = float((expert(x) - ref).norm() / ref.norm())
    assert 0 < err[8] < err[4] < err[2] < 1.0, err
