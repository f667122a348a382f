"""TTT policy decisions with synthetic telemetry, and the trainer's full / light / skip steps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ttha import kernels
from ttha.costs import KernelCostModel
from ttha.kernels import _backend
from ttha.model import FP8Expert, MoELM, QuantizedExpert, SimpleExpert, softmax_topk
from ttha.ttt import TestTimeTrainer, TTTPolicy, light_parameters

TARGETS = OmegaConf.create({"power_w": 300.0, "temp_c": 80.0, "latency_ms": 100.0})
TOKENS = 512


def cost_model(energy=True):
    """TTT full: 20 ms, 4 J (200 W over a 20 ms step); light: 5 ms, 1 J — flat in batch size."""
    def op(lat, e):
        return {"batch_sizes": [1, 4096], "latency_ms": [lat, lat], "energy_j": [e, e] if energy else None}
    return KernelCostModel({"schema_version": 1, "gpu": "test", "estimated": False, "source": "unit test",
                            "shape": {"d_model": 8, "d_ff": 16},
                            "ops": {"ttt_full": op(20.0, 4.0), "ttt_light": op(5.0, 1.0)}})


def sample(power_w, temp_c=60.0):
    return SimpleNamespace(power_w=power_w, temp_c=temp_c, util_pct=90.0, sm_clock_mhz=1900.0, energy_j=0.0)


def policy(name="budget", energy=True):
    return TTTPolicy(OmegaConf.create({"policy": name, "full_lr": 1e-3, "light_lr": 1e-2}), cost_model(energy),
                     TARGETS)


@pytest.mark.parametrize("power_w, temp_c, latency_ms, mode, why", [
    # step time 40 ms: full adds 4 J / 40 ms = 100 W, light 1 J / 40 ms = 25 W
    (150.0, 60.0, 40.0, "full", "fit"),
    (250.0, 60.0, 40.0, "light", "power 250+100 W > target 300 W"),   # full 350 W > 300, light 275 W
    (290.0, 60.0, 40.0, "skip", "power 290+25 W > target 300 W"),     # even light breaks the budget
    (150.0, 85.0, 40.0, "skip", "temp 85.0 C >= target 80.0 C"),      # hot: no TTT at all
    (150.0, 60.0, 90.0, "light", "latency 90.0+20.0 ms > target"),    # latency headroom for light only
    (150.0, 60.0, 97.0, "skip", "latency 97.0+5.0 ms > target"),
    # first step (no latency yet): the TTT step's own latency is the step time, 4 J / 20 ms = 200 W
    (90.0, 60.0, 0.0, "full", "fit"),
    (150.0, 60.0, 0.0, "skip", "power 150+200 W > target 300 W"),
])
def test_budget_policy_decisions(power_w, temp_c, latency_ms, mode, why):
    got, reason = policy().decide(sample(power_w, temp_c), TOKENS, latency_ms)
    assert got == mode, reason
    assert why in reason and reason.startswith(mode)


def test_budget_policy_prediction_and_unknown_energy():
    extra_w, extra_ms = policy().predict("full", TOKENS, 0.0)
    assert extra_w == pytest.approx(4.0 / 0.020) and extra_ms == 20.0
    # a CPU-profiled cost model has no energy: only temperature and latency decide
    mode, reason = policy(energy=False).decide(sample(1000.0), TOKENS, 40.0)
    assert mode == "full" and "power unknown" in reason


def test_budget_policy_predicts_from_the_measured_step():
    """A measured 80 ms full step (the cost model says 20 ms): the prediction takes it, with the energy scaled
    the same (16 J: 200 W over 80 ms), and the decision follows; light keeps the cost model until measured;
    nonsense measurements are ignored."""
    p = policy()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        p.observe("full", bad)
    p.observe("skip", 5.0)
    assert p.predict("full", TOKENS, 0.0) == pytest.approx((200.0, 20.0)) and p.measured == {}
    p.observe("full", 80.0)
    extra_w, extra_ms = p.predict("full", TOKENS, 40.0)
    assert extra_ms == 80.0 and extra_w == pytest.approx(16.0 / 0.080)
    assert p.predict("light", TOKENS, 40.0) == pytest.approx((25.0, 5.0))
    mode, reason = p.decide(sample(50.0), TOKENS, 40.0)  # full: 50 + 200 W fits, 40 + 80 ms > 100 ms; light fits
    assert mode == "light" and "latency 40.0+80.0 ms > target" in reason


def test_fixed_policies_and_bad_policy():
    assert policy("always").decide(sample(1000.0, 99.0), TOKENS, 500.0)[0] == "full"
    assert policy("never").decide(sample(10.0, 20.0), TOKENS, 1.0)[0] == "skip"
    with pytest.raises(ValueError, match="ttt.policy"):
        TTTPolicy({"policy": "sometimes"}, cost_model(), TARGETS)


class StandIn(nn.Module):
    """A byte LM with a norm, a gate, an expert and a packed (buffer) quantized weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.norm = nn.LayerNorm(16)
        self.gate = nn.Linear(16, 4, bias=False)
        self.expert = nn.Linear(16, 16)
        self.register_buffer("packed", torch.randint(0, 255, (8,), dtype=torch.uint8))
        self.head = nn.Linear(16, 256)

    def forward(self, idx):
        h = self.norm(self.embed(idx))
        h = h + self.expert(h) * torch.softmax(self.gate(h), -1)[..., :1]
        return self.head(h)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch(seed=0):
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(seed))


def test_light_step_changes_only_norms_and_gates():
    torch.manual_seed(0)
    model = StandIn()
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-3, "light_lr": 1e-2}))
    assert {id(p) for p in light_parameters(model)} == {id(p) for p in
                                                      (*model.norm.parameters(), *model.gate.parameters())}
    before = snapshot(model)
    loss = trainer.step(batch(), "light")
    after = snapshot(model)
    assert isinstance(loss, float) and loss > 0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"norm.weight", "norm.bias", "gate.weight"}
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(("norm", "gate")))


def test_full_step_changes_every_float_parameter_and_lowers_the_loss():
    torch.manual_seed(0)
    model = StandIn()
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    before = snapshot(model)
    losses = [trainer.step(batch(), "full") for _ in range(5)]
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k, _ in model.named_parameters()}  # the uint8 buffer is untouched
    assert losses[-1] < losses[0]


def test_skip_does_no_work():
    model = StandIn()
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-3, "light_lr": 1e-3}))
    before = snapshot(model)
    assert trainer.step(batch(), "skip") is None
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match="mode"):
        trainer.step(batch(), "half")


def test_light_step_on_the_moe_model(compose_cfg):
    model_mod = pytest.importorskip("ttha.model")
    cfg = compose_cfg("model=tiny", "model.dtype=fp32").model
    torch.manual_seed(0)
    model = model_mod.MoELM(cfg)
    light = {id(p) for p in light_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in light}
    expected = {f"{m}.{p}" for m, mod in model.named_modules()
                if isinstance(mod, nn.LayerNorm) or m.endswith("moe.gate") for p, _ in mod.named_parameters()}
    assert any(n.endswith("moe.gate.weight") for n in names) and names == expected, names ^ expected
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-3, "light_lr": 1e-2}))
    before = snapshot(model)
    trainer.step(batch(), "light")
    changed = {k for k, v in snapshot(model).items() if not torch.equal(before[k], v)}
    assert changed and changed <= names


def test_budget_policy_without_a_reading_skips():
    mode, reason = policy().decide(sample(float("nan"), float("nan")), TOKENS, 10.0)
    assert mode == "skip" and "no telemetry" in reason


def test_time_step_leaves_the_model_and_optimizer_untouched():
    """Timing a step (warm-up) runs its forward and backward but changes no weight and creates no optimizer
    state; a mode with nothing to train times nothing."""
    torch.manual_seed(0)
    model = StandIn()
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    before = snapshot(model)
    for mode in ("full", "light"):
        seconds = trainer.time_step(batch(), mode)
        assert seconds is not None and seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer._optimizers == {} and all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    assert trainer.time_step(batch(), "full") is None


def test_full_step_when_no_token_reaches_an_expert():
    """A batch may route no token to an expert (a sharp gate, a router steering tokens away): that expert has no
    gradient, which neither the timed warm-up step nor a step may fail on, and its weights stay as they were."""
    torch.manual_seed(0)
    model = MoELM(OmegaConf.create({"vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
                                    "n_experts": 4, "top_k": 2, "max_seq_len": 32}))
    hidden = torch.tensor([True, False, False, False])
    model.set_router(lambda logits, layer: softmax_topk(logits.masked_fill(hidden, float("-inf")), 2))
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    experts = model.moe_layers[0].experts
    before = [e.w1.weight.detach().clone() for e in experts]
    assert trainer.time_step(batch(), "full") > 0
    assert trainer.step(batch(), "full") is not None
    assert torch.equal(experts[0].w1.weight, before[0])
    assert not any(torch.equal(e.w1.weight, b) for e, b in zip(experts[1:], before[1:]))


def test_time_step_times_the_step_not_its_first_compile(monkeypatch):
    """The first forward of a mode compiles and tunes its kernels (seconds on a GPU): the policy must learn what
    a step costs, not what the first one did. A fake clock: the first forward takes 10 s, later ones 10 ms."""
    clock, forwards = [0.0], []

    class Compiling(StandIn):
        def forward(self, idx):
            clock[0] += 10.0 if not forwards else 0.01
            forwards.append(1)
            return super().forward(idx)

    monkeypatch.setattr("ttha.ttt.time.perf_counter", lambda: clock[0])
    trainer = TestTimeTrainer(Compiling(), OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    assert trainer.time_step(batch(), "full") == pytest.approx(0.01)


@pytest.mark.parametrize("simulated", [False, True])
def test_serving_ttt_step_teaches_the_policy_on_the_wall_clock_only(simulated):
    """On a GPU's wall clock, the last warm-up batch times both modes for the policy and each step taken
    replaces its mode's time; on the simulated clock nothing is measured (a run must not depend on the host)."""
    from ttha.serving import StepClock, ttt_step
    torch.manual_seed(0)
    p, clock = policy(), StepClock()
    trainer = TestTimeTrainer(StandIn(), OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    s = SimpleNamespace(device=torch.device("cuda"), policy=p, trainer=trainer)  # the device only gates measuring
    run_clock = SimpleNamespace(simulated=simulated)
    assert ttt_step(s, run_clock, clock, batch(), sample(50.0), 0.0, -1)[0] == "skip"
    assert set(p.measured) == (set() if simulated else {"full", "light"})
    timed = dict(p.measured)
    mode, _ = ttt_step(s, run_clock, clock, batch(), sample(50.0), 0.0, 0)
    assert mode == "full"
    if simulated:
        assert p.measured == {}
    else:
        assert p.measured["full"] == clock.span["ttt"] * 1000.0 and p.measured["light"] == timed["light"]


@pytest.mark.parametrize("policy_name", ["always", "budget"])
def test_warm_up_trains_nothing_whatever_the_policy_or_telemetry(policy_name):
    """Warm-up runs under telemetry no row records (the GPU still starting): a step taken there would let two
    runs of one model enter the measured phase with different weights. The first measured batch trains."""
    from ttha.serving import StepClock, ttt_step
    torch.manual_seed(0)
    model = StandIn()
    trainer = TestTimeTrainer(model, OmegaConf.create({"full_lr": 1e-2, "light_lr": 1e-2}))
    s = SimpleNamespace(device=torch.device("cpu"), trainer=trainer, policy=policy(policy_name))
    before, run_clock = snapshot(model), SimpleNamespace(simulated=True)
    for step in (-3, -2, -1):
        assert ttt_step(s, run_clock, StepClock(), batch(), sample(50.0), 0.0, step) == ("skip", "warm-up")
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items()) and trainer._optimizers == {}
    assert ttt_step(s, run_clock, StepClock(), batch(), sample(50.0), 0.0, 0)[0] == "full"
    assert any(not torch.equal(before[k], v) for k, v in snapshot(model).items())


@pytest.mark.skipif(not _backend.HAS_TRITON or not (torch.cuda.is_available() or _backend.interpreting()),
                    reason="needs triton on CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [4, 2])
def test_the_kernel_path_backpropagates_through_a_quantized_expert_like_the_reference(bits):
    """TTT trains the layers below a quantized expert: with the Triton backend its output must carry x's
    gradient, the same as the torch reference's (the kernel writes outside autograd)."""
    torch.manual_seed(0)
    expert = QuantizedExpert.from_dense(SimpleExpert(64, 128).to(torch.bfloat16), bits, 32)
    x0, g = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    grads = {}
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            x = x0.clone().requires_grad_()
            (expert(x).float() * g.float()).sum().backward()
            grads[backend] = x.grad.float()
    finally:
        kernels.set_backend("auto")
    assert grads["triton"].abs().max() > 0
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=0.03, atol=0.03 * grads["torch"].abs().max())


def test_an_fp8_expert_passes_x_gradient_like_its_dense_expert():
    """Rounding x to fp8 has no gradient of its own: without passing x's straight through, TTT got (almost) no
    gradient below an fp8 expert. Its gradient must be the dense expert's, up to fp8's rounding."""
    torch.manual_seed(0)
    dense = SimpleExpert(64, 128)
    fp8 = FP8Expert.from_dense(dense)
    x0, g = torch.randn(5, 64), torch.randn(5, 64)
    grads = []
    for expert in (dense, fp8):
        x = x0.clone().requires_grad_()
        (expert(x) * g).sum().backward()
        grads.append(x.grad)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.1
    with torch.no_grad():  # and the values are fp8's, not the dense expert's
        assert not torch.equal(fp8(x0), dense(x0))
