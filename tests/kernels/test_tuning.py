"""The decode-chain tuner: fastest config kept in memory and on disk, failures skipped, nothing timed in a capture."""
import json

import pytest
import torch

from ttha.kernels import tuning


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "chain.json"
    monkeypatch.setenv("TTHA_CHAIN_CACHE", str(path))
    monkeypatch.setattr(tuning, "_MEMO", {})
    return path


CONFIGS = [{"BN": 64, "SPLIT_K": 1, "num_warps": 4}, {"BN": 128, "SPLIT_K": 2, "num_warps": 8},
           {"BN": 32, "SPLIT_K": 4, "num_warps": 2}]
TIMES = {64: 20.5, 128: 17.25, 32: 31.0}


def test_picks_the_fastest_chain_and_keeps_it_on_disk(cache):
    timed = []

    def time_us(cfg):
        timed.append(cfg["BN"])
        return TIMES[cfg["BN"]]

    assert tuning.best_config("H100|gemv|28672|8192|4", CONFIGS, time_us) == CONFIGS[1]
    assert timed == [64, 128, 32]  # every config timed once
    assert json.loads(cache.read_text()) == {"H100|gemv|28672|8192|4": CONFIGS[1]}
    # a new process (empty memo) reads the file, checks the entry against the space and times nothing
    tuning._MEMO.clear()
    never = lambda cfg: pytest.fail("timed again")  # noqa: E731
    assert tuning.best_config("H100|gemv|28672|8192|4", iter(CONFIGS), never) == CONFIGS[1]

    def space():  # the caller's lazily built config space: not built when the key is remembered
        pytest.fail("config space built for a remembered key")
        yield

    assert tuning.best_config("H100|gemv|28672|8192|4", space(), never) == CONFIGS[1]
    # another key is tuned and merged into the same file
    assert tuning.best_config("H100|mma|4096|14336|2", CONFIGS[::2], lambda c: TIMES[c["BN"]]) == CONFIGS[0]
    assert set(json.loads(cache.read_text())) == {"H100|gemv|28672|8192|4", "H100|mma|4096|14336|2"}


def test_configs_that_fail_are_skipped_and_all_failing_gives_none(cache):
    def time_us(cfg):
        if cfg["BN"] == 128:
            raise RuntimeError("out of resources: shared memory")
        return TIMES[cfg["BN"]]

    assert tuning.best_config("k1", CONFIGS, time_us) == CONFIGS[0]

    def broken(cfg):
        raise RuntimeError("no kernel image")

    assert tuning.best_config("k2", CONFIGS, broken) is None
    assert "k2" not in json.loads(cache.read_text())  # nothing recorded for it: the next run tries again


def test_nothing_is_timed_inside_a_graph_capture(cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    never = lambda cfg: pytest.fail("timed during a capture")  # noqa: E731
    assert tuning.best_config("k3", CONFIGS, never) is None
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"k3": CONFIGS[2]}))  # tuned before the capture (another run): used
    assert tuning.best_config("k3", CONFIGS, never) == CONFIGS[2]


def test_a_corrupt_or_unwritable_cache_does_not_stop_the_call(cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert tuning.best_config("k4", CONFIGS, lambda c: TIMES[c["BN"]]) == CONFIGS[1]
    assert json.loads(cache.read_text()) == {"k4": CONFIGS[1]}  # rewritten whole
    tuning._MEMO.clear()
    monkeypatch.setenv("TTHA_CHAIN_CACHE", "/proc/no/such/dir/chain.json")  # cannot be created
    assert tuning.best_config("k5", CONFIGS, lambda c: TIMES[c["BN"]]) == CONFIGS[1]
    assert tuning._MEMO["k5"] == CONFIGS[1]  # still remembered for this process


@pytest.mark.parametrize("entry", [
    {"BLOCK_N": "banana"},                                    # not a key of the space
    {"BN": "banana", "SPLIT_K": 2, "num_warps": 8},           # a value of the wrong type
    {"BN": 128.0, "SPLIT_K": 2, "num_warps": 8},              # JSON's float for an int
    {"BN": 96, "SPLIT_K": 2, "num_warps": 8},                 # well formed, not in the space
    {"BN": 128, "SPLIT_K": 2, "num_warps": 8, "ADD": True},   # an extra key
    {"BN": 128, "SPLIT_K": 2},                                # a key missing
    [128, 2, 8], "BN=128", None,                              # not a config at all
])
def test_a_stored_entry_outside_the_space_is_tuned_again(cache, entry, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"k6": entry, "other": CONFIGS[0]}))
    timed = []

    def time_us(cfg):
        timed.append(cfg["BN"])
        return TIMES[cfg["BN"]]

    with caplog.at_level("WARNING", logger="ttha.kernels"):
        assert tuning.best_config("k6", CONFIGS, time_us) == CONFIGS[1]
    assert timed == [64, 128, 32]
    assert any("k6" in r.getMessage() and "tuning again" in r.getMessage() for r in caplog.records)
    assert json.loads(cache.read_text()) == {"k6": CONFIGS[1], "other": CONFIGS[0]}  # replaced, others kept


def test_an_invalid_entry_is_not_used_inside_a_capture(cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"k7": {"BLOCK_N": "banana"}}))
    assert tuning.best_config("k7", CONFIGS, lambda cfg: pytest.fail("timed during a capture")) is None
