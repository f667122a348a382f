"""Test-time training (TTT): a policy that picks full / light / skip per batch, and the trainer.

Policies (cfg.ttt.policy): always = full every batch; never = skip; budget = the predicted cost of a TTT
step (KernelCostModel ops ttt_full / ttt_light at the batch's tokens; their latency replaced by this run's own
measurement of the mode once there is one, observe(), and the energy scaled with it: the cost model's TTT ops
were profiled on one model, a run may serve a larger one) plus the current telemetry against the targets:
    predicted extra power = energy of the TTT step / step time (max of the last step's latency and the
                            TTT step's own latency)
    full  if power + extra_full <= power target, temp < temp target, latency + ttt latency <= latency target
    light if the same holds with the light step's costs
    skip  otherwise.
When the cost model has no energy (profiled on a CPU) the power check is skipped and the reason says so.

TestTimeTrainer: one Adam step of next-byte cross-entropy. full = every floating-point parameter (16-bit
experts, attention, norms, gates; quantized experts' packed weights are buffers, not parameters);
light = only norms and router gates. Adam (not SGD) because the configured learning rates (1e-4 / 1e-3)
are Adam-scale and one optimizer state per mode persists across steps.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from ttha.config import option
from ttha.costs import KernelCostModel
from ttha.model import next_byte_loss

MODES = ("full", "light", "skip")
POLICIES = ("always", "never", "budget")
GATE_NAMES = ("gate", "router")  # module names of MoE gates (MoELM's MoEFFN.gate)


class TTTPolicy:
    def __init__(self, ttt_cfg, cost_model: KernelCostModel, targets):
        self.policy = str(option(ttt_cfg, "policy", "budget"))
        if self.policy not in POLICIES:
            raise ValueError(f"ttt.policy={self.policy!r}: must be one of {', '.join(POLICIES)}")
        self.cost_model = cost_model
        self.targets = {k: float(option(targets, k, 0.0)) for k in ("power_w", "temp_c", "latency_ms")}
        for k, v in self.targets.items():
            if v <= 0:
                raise ValueError(f"targets.{k}={v!r}: must be > 0")
        self.measured: dict[str, float] = {}  # mode -> ms of this run's latest TTT step of that mode

    def observe(self, mode: str, latency_ms: float) -> None:
        """A TTT step of `mode` took latency_ms here (wall clock, GPU work included): later predictions use it."""
        if mode in ("full", "light") and math.isfinite(latency_ms) and latency_ms > 0:
            self.measured[mode] = float(latency_ms)

    def predict(self, mode: str, batch_tokens: int, latency_ms: float) -> tuple[float | None, float]:
        """(extra power in W or None when energy is unknown, extra latency in ms) of a TTT step: the cost
        model's, at this run's measured latency where there is one (its energy scaled by the same ratio)."""
        cost = self.cost_model.get_cost(f"ttt_{mode}", batch_tokens)
        ms = self.measured.get(mode, cost.latency_ms)
        step_s = max(float(latency_ms), ms) / 1000.0
        power = None if cost.energy_j is None else cost.energy_j * ms / max(cost.latency_ms, 1e-9) / step_s
        return power, ms

    def _fits(self, mode: str, sample, batch_tokens: int, latency_ms: float) -> tuple[bool, str]:
        t = self.targets
        extra_w, extra_ms = self.predict(mode, batch_tokens, latency_ms)
        if not (math.isfinite(sample.power_w) and math.isfinite(sample.temp_c)):
            return False, "no telemetry reading yet"  # unknown headroom: spend nothing
        if sample.temp_c >= t["temp_c"]:
            return False, f"temp {sample.temp_c:.1f} C >= target {t['temp_c']:.1f} C"
        if extra_w is not None and sample.power_w + extra_w > t["power_w"]:
            return False, f"power {sample.power_w:.0f}+{extra_w:.0f} W > target {t['power_w']:.0f} W"
        if latency_ms + extra_ms > t["latency_ms"]:
            return False, f"latency {latency_ms:.1f}+{extra_ms:.1f} ms > target {t['latency_ms']:.1f} ms"
        power = "power unknown" if extra_w is None else f"power {sample.power_w:.0f}+{extra_w:.0f} W"
        return True, f"{power}, temp {sample.temp_c:.1f} C, latency {latency_ms:.1f}+{extra_ms:.1f} ms fit"

    def decide(self, sample, batch_tokens: int, latency_ms: float) -> tuple[str, str]:
        """('full' | 'light' | 'skip', one-line reason)."""
        if self.policy == "always":
            return "full", "policy=always"
        if self.policy == "never":
            return "skip", "policy=never"
        ok, why_full = self._fits("full", sample, batch_tokens, latency_ms)
        if ok:
            return "full", f"full: {why_full}"
        ok, why_light = self._fits("light", sample, batch_tokens, latency_ms)
        if ok:
            return "light", f"light: full would break budget ({why_full}); {why_light}"
        return "skip", f"skip: light would break budget ({why_light})"


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
        (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return isinstance(module, norm_types) or type(module).__name__.endswith("Norm")


def light_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of normalisation layers and of MoE gates (modules named 'gate' or 'router')."""
    seen, params = set(), []
    for name, module in model.named_modules():
        if _is_norm(module) or name.rsplit(".", 1)[-1] in GATE_NAMES:
            for p in module.parameters():
                if id(p) not in seen and p.is_floating_point():
                    seen.add(id(p))
                    params.append(p)
    return params


def full_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.is_floating_point()]


class TestTimeTrainer:
    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, ttt_cfg):
        self.model = model
        self.lr = {"full": float(option(ttt_cfg, "full_lr", 1e-4)), "light": float(option(ttt_cfg, "light_lr", 1e-3))}
        for mode, lr in self.lr.items():
            if lr < 0:
                raise ValueError(f"ttt.{mode}_lr={lr!r}: must be >= 0")
        self.params = {"full": full_parameters(model), "light": light_parameters(model)}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    def _optimizer(self, mode: str) -> torch.optim.Optimizer | None:
        if mode not in self._optimizers and self.params[mode]:
            self._optimizers[mode] = torch.optim.Adam(self.params[mode], lr=self.lr[mode])
        return self._optimizers.get(mode)

    def time_step(self, batch: torch.Tensor, mode: str) -> float | None:
        """Seconds of a `mode` step's forward and backward on batch [B, S+1], synchronised, its gradients
        discarded (the model is not changed): compiles and tunes the step's kernels before a measured phase, and
        gives the budget policy this model's cost here. The step runs twice and the second is timed: the first
        pays the one-time compiling and tuning, which is not what a step costs. None when the mode trains
        nothing."""
        params = self._trainable(mode)
        if not params:
            return None
        sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
        for _ in range(2):
            sync()
            t = time.perf_counter()
            with torch.enable_grad():
                # allow_unused: an expert the batch routes no token to has no gradient
                grads = torch.autograd.grad(self._loss(batch), params, allow_unused=True)
            sync()
            del grads
        return time.perf_counter() - t

    def _trainable(self, mode: str) -> list[nn.Parameter]:
        return [p for p in self.params.get(mode, []) if p.requires_grad]

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-byte cross-entropy of batch [B, S+1]."""
        return next_byte_loss(self.model(batch[:, :-1]), batch[:, 1:])

    def step(self, batch: torch.Tensor, mode: str) -> float | None:
        """One optimizer step of next-byte CE on batch [B, S+1]; None for 'skip' (no work)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if mode == "skip":
            return None
        opt = self._optimizer(mode)
        if opt is None:
            return None
        params = self._trainable(mode)
        if not params:
            return None
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self._loss(batch)
            # gradients only for this mode's parameters: a light step skips the weight gradients
            loss.backward(inputs=params)
        opt.step()
        return float(loss.detach())
