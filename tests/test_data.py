"""The corpus: split by module, deterministic, shifted; its cache is keyed by config, never runs code, and a
damaged one is rebuilt with one warning."""
import logging
import os
from pathlib import Path

import pytest
import torch

from ttha import cache, data, pretrain


@pytest.fixture
def texts(tmp_path) -> Path:
    for pkg, text in (("alpha", "a = 1\n" * 50), ("beta", "b = 2\n" * 50), ("gamma", "c = 3\n" * 50),
                      ("delta", "d = 4\n" * 50)):
        (tmp_path / "texts" / pkg).mkdir(parents=True)
        (tmp_path / "texts" / pkg / "mod.txt").write_text(text)
    return tmp_path / "texts"


@pytest.fixture
def cfg(compose_cfg, tmp_path, texts):
    return compose_cfg(f"pretrain.cache_dir={tmp_path / 'cache'}", f"data.corpus_dir={texts}")


def test_corpus_split_is_by_module_deterministic_and_shifted(cfg):
    c1, c2 = data.load_corpus(cfg.data), data.load_corpus(cfg.data)
    assert torch.equal(c1.train, c2.train) and torch.equal(c1.test, c2.test)
    train_mods = {Path(f).parent.name for f in c1.train_files}
    test_mods = {Path(f).parent.name for f in c1.test_files}
    assert test_mods and train_mods and not train_mods & test_mods  # whole modules held out
    assert data.unigram_perplexity(torch.tensor([65, 66] * 100, dtype=torch.uint8)) == pytest.approx(2.0)


def test_corpus_is_cached_by_its_config(cfg, compose_cfg, tmp_path, texts):
    first = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    (cached,) = (tmp_path / "cache").glob("corpus-*.safetensors")
    assert Path(str(cached).replace(".safetensors", ".json")).exists()
    again = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    assert torch.equal(first.train, again.train) and torch.equal(first.test, again.test)
    assert first.test_files == again.test_files and first.train_files == again.train_files
    other = compose_cfg(f"pretrain.cache_dir={tmp_path / 'cache'}", f"data.corpus_dir={texts}", "data.seed=5")
    other = data.cached_corpus(other.data, pretrain.cache_dir(other))
    assert len(list((tmp_path / "cache").glob("corpus-*.safetensors"))) == 2 and other.train.numel() > 0


def test_a_truncated_corpus_cache_is_rebuilt_with_one_warning(cfg, tmp_path, caplog):
    first = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    (path,) = (tmp_path / "cache").glob("corpus-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corpus cache" in warnings[0].getMessage()
    assert "sha256" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert torch.equal(first.train, again.train) and torch.equal(first.test, again.test)
    assert path.stat().st_size > 100  # rewritten whole


def test_a_crafted_corpus_file_never_runs(cfg, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    (path,) = (tmp_path / "cache").glob("corpus-*.safetensors")
    stem = Path(str(path)[: -len(".safetensors")])
    for target in (Path(f"{stem}.pt"), path):  # the old cache's name, and the new one's
        torch.save({"train": Payload(), "test": Payload()}, target)
    corpus = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    assert not marker.exists() and corpus.train.dtype == torch.uint8 and corpus.train.numel() > 0


def test_an_entry_whose_hash_matches_but_is_not_a_corpus_is_refused(cfg, tmp_path):
    """A hand-made entry with a valid hash and the wrong tensors: the caller's check refuses it."""
    data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    (path,) = (tmp_path / "cache").glob("corpus-*.safetensors")
    stem = Path(str(path)[: -len(".safetensors")])
    _, meta = cache.load(stem)
    cache.save(stem, {"train": torch.zeros(3, dtype=torch.float32), "test": torch.zeros(3)}, meta)
    corpus = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 3
