"""Pretraining: the tiny model really learns, the cache is keyed by what changes the weights, data splits."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ttha import data, model as model_mod, pretrain

ROOT = Path(__file__).resolve().parents[1]


def _cfg(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"pretrain.cache_dir={cache}", *overrides])


@pytest.mark.slow
def test_default_tiny_model_beats_half_the_unigram_perplexity_and_is_cached(tmp_path):
    cfg = _cfg(tmp_path)  # the default run's model and pretraining (what `python train.py` trains)
    model, info = pretrain.load_or_train(cfg, torch.device("cpu"))
    assert not info["cached"]
    assert info["test_perplexity"] <= 0.5 * info["unigram_perplexity"], info
    again, info2 = pretrain.load_or_train(cfg, torch.device("cpu"))
    assert info2["cached"] and info2["cache_path"] == info["cache_path"]
    assert info2["test_perplexity"] == info["test_perplexity"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_key_follows_what_changes_the_weights(tmp_path):
    base = pretrain.cache_key(_cfg(tmp_path))
    assert pretrain.cache_key(_cfg(tmp_path, "pretrain.steps=7")) != base
    assert pretrain.cache_key(_cfg(tmp_path, "model.d_model=64")) != base
    assert pretrain.cache_key(_cfg(tmp_path, "seed=3")) != base
    # a fixed pretrain.seed shares one pretrained model across serving seeds
    assert pretrain.cache_key(_cfg(tmp_path, "seed=3", "pretrain.seed=0")) == base
    # serving choices and where the cache lives do not retrain
    assert pretrain.cache_key(_cfg(tmp_path / "elsewhere", "experts=int2", "router=static",
                                   "model.dtype=bf16")) == base


def test_corpus_split_is_by_module_deterministic_and_shifted(tmp_path):
    for pkg, text in (("alpha", "a = 1\n" * 50), ("beta", "b = 2\n" * 50), ("gamma", "c = 3\n" * 50),
                      ("delta", "d = 4\n" * 50)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "mod.txt").write_text(text)
    cfg = _cfg(tmp_path / "cache", f"data.corpus_dir={tmp_path}").data
    c1, c2 = data.load_corpus(cfg), data.load_corpus(cfg)
    assert torch.equal(c1.train, c2.train) and torch.equal(c1.test, c2.test)
    train_mods = {Path(f).parent.name for f in c1.train_files}
    test_mods = {Path(f).parent.name for f in c1.test_files}
    assert test_mods and train_mods and not train_mods & test_mods  # whole modules held out
    assert data.unigram_perplexity(torch.tensor([65, 66] * 100, dtype=torch.uint8)) == pytest.approx(2.0)


def test_quantized_experts_cost_quality_in_proportion_to_bits(tmp_path):
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


def test_corpus_is_cached_by_its_config(tmp_path):
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "b").mkdir()
    (tmp_path / "texts" / "a" / "x.txt").write_text("alpha " * 300)
    (tmp_path / "texts" / "b" / "y.txt").write_text("beta " * 300)
    cfg = _cfg(tmp_path / "cache", f"data.corpus_dir={tmp_path / 'texts'}")
    first = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    (cached,) = (tmp_path / "cache").glob("corpus-*.pt")
    again = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    assert torch.equal(first.train, again.train) and first.test_files == again.test_files
    other = _cfg(tmp_path / "cache", f"data.corpus_dir={tmp_path / 'texts'}", "data.seed=5")
    other = data.cached_corpus(other.data, pretrain.cache_dir(other))
    assert len(list((tmp_path / "cache").glob("corpus-*.pt"))) == 2 and other.train.numel() > 0
