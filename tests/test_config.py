"""ttha.config.validate: every numeric key finite, every count an integer, the model's size known before it
is built."""
from pathlib import Path

import pytest

from ttha import config
from ttha.config import ConfigError
from ttha.model import MoELM
from ttha.paths import conf_dir


@pytest.mark.parametrize("key", config.POSITIVE + config.NON_NEGATIVE)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_numeric_key_must_be_finite(compose_cfg, key, value):
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(f"{key}={value}"))
    expected = "must be an integer" if key in config.INTEGER else "must be a finite number"
    assert (err.value.key, err.value.problem) == (key, expected)


@pytest.mark.parametrize("key", config.INTEGER)
def test_every_integer_key_refuses_a_fraction(compose_cfg, key):
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(f"{key}=2.5"))
    assert (err.value.key, err.value.problem) == (key, "must be an integer")


@pytest.mark.parametrize("value", ["1", "1.5"])
def test_expert_drop_is_a_probability_below_one(compose_cfg, value):
    """1 would hide every expert from every sequence (a layer then keeps them all: no drop at all)."""
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(f"pretrain.expert_drop={value}"))
    assert str(err.value) == f"pretrain.expert_drop={value}: must be below 1 (a probability)"


@pytest.mark.parametrize("value, problem", [
    ("[3]", "must be null or a list of bits (2, 4, 8, 16)"), ("[]", "must be null or a list of bits (2, 4, 8, 16)"),
    ("16", "must be null or a list of bits (2, 4, 8, 16)"), ("[8]", "no expert of experts.bits=[16, 4, 2] has these bits")])
def test_expert_drop_bits_names_bits_some_expert_has(compose_cfg, value, problem):
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg("pretrain.expert_drop=0.3", f"pretrain.expert_drop_bits={value}"))
    assert (err.value.key, err.value.problem) == ("pretrain.expert_drop_bits", problem)


@pytest.mark.parametrize("extra", [["pretrain.expert_drop_experts=[6]"], ["pretrain.expert_drop_experts=[]"],
                                   ["pretrain.expert_drop_experts=[-1]"], ["pretrain.expert_drop_experts=0"],
                                   ["pretrain.expert_drop_experts=[0]", "pretrain.expert_drop_bits=[16]"]])
def test_expert_drop_experts_are_indices_of_the_model_and_exclude_bits(compose_cfg, extra):
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg("pretrain.expert_drop=0.3", *extra))
    assert str(err.value).startswith("pretrain.expert_drop_experts=")
    assert err.value.problem == "must be null or a list of expert indices in 0..5, with pretrain.expert_drop_bits null"
    config.validate(compose_cfg("pretrain.expert_drop=0.3", "pretrain.expert_drop_experts=[0,5]", "experts=int2"))


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_model_parameters_counts_what_moelm_builds(compose_cfg, model):
    m = compose_cfg(f"model={model}").model
    assert config.model_parameters(m) == sum(p.numel() for p in MoELM(m).parameters())


def test_the_default_config_is_valid(cfg):
    config.validate(cfg)


def test_a_cache_dir_under_proc_is_refused_though_os_access_passes_it(compose_cfg):
    """/proc: os.access says writable to root, yet nothing can be created there."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg("pretrain.cache_dir=/proc/ttha-x"))
    line = str(err.value)
    assert line.startswith("pretrain.cache_dir='/proc/ttha-x': /proc is not writable (") and "\n" not in line


def test_a_writable_cache_dir_passes_and_the_probe_leaves_nothing(compose_cfg, tmp_path):
    config.validate(compose_cfg(f"pretrain.cache_dir={tmp_path / 'cache'}"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what, problem", [("missing", "file does not exist"),
                                           ("folder", "is a folder, not a cost-model JSON file")])
def test_a_cost_model_that_is_not_a_file_is_one_line_naming_the_key(compose_cfg, tmp_path, what, problem):
    path = tmp_path / "costs.json"
    if what == "folder":
        path.mkdir()
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(f"cost_model={path}"))
    assert str(err.value) == f"cost_model='{path}': {problem}"


@pytest.mark.parametrize("value", ["banana", "[all]"])
def test_a_bad_tracking_plots_is_refused_by_validate(compose_cfg, value):
    """Before any work: the tracker, which alone refused it, starts after the telemetry monitor and the corpus."""
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(f"tracking.plots={value}"))
    assert err.value.key == "tracking.plots"
    assert str(err.value).endswith(": must be all, timeline or none (true = all, false = none)")


@pytest.mark.parametrize("value", ["banana", "1"])
def test_router_per_expert_is_a_bool(compose_cfg, value):
    cfg = compose_cfg("router=ttha", f"router.per_expert={value}")
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    assert str(err.value) == f"router.per_expert={cfg.router.per_expert!r}: must be true or false"
    config.validate(compose_cfg("router=ttha", "router.per_expert=null"))  # left out: no per-expert input


@pytest.mark.parametrize("preset", sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(compose_cfg, tmp_path, preset):
    """A bad value in a GPU preset would fail its first run on the device; here it fails on the CPU (GPU telemetry
    and stress swapped for their simulated forms)."""
    cfg = compose_cfg(f"experiment={preset}", "telemetry=sim", "stress.kind=none", "device=cpu",
                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"pretrain.cache_dir={tmp_path}")
    config.validate(cfg)
