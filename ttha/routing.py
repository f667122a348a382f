"""Hardware-adaptive MoE routing: AdaptiveRouter and the TTHA loss (the adapter: adapter.py; the load balance:
balance.py; the expected-activation cost and the quality guard: objective.py).

The router plugs into MoELM.set_router: (gate logits [T, E] fp32, layer) -> (weights [T, k], indices [T, k])
= top-k of softmax(logits + bias), renormalised; a decode step records its gate logits with record_decode.
For router.name == 'ttha' the bias is

    alpha x clamp(center(adapter bias + cost bias))
    adapter bias   TTHAAdapter(cost features [E, C] (+ one-hot expert id with router.per_expert), hardware
                   features [H]) -> [E], learned online; without the id, experts of one precision share a bias
    cost bias      -cost_bias_scale * (s_power * energy_e + s_temp * energy_e + s_latency * latency_e)
    alpha          the quality guard: the largest scale in [0, 1] that keeps the mean KL(gate || routed) of
                   the last recorded gate probabilities within router.max_drift

center() subtracts the mean over experts: routing is blind to a common shift, which would otherwise drift under
Adam until every expert sits on the clamp. s_x = max(0, reading / target - 1); energy_e, latency_e are the
expert's costs (KernelCostModel) over the most expensive expert's: per token in batches, per activation (a read
of its weights) in decode, there x P(e idle) (waking an idle expert costs its read, one more token about nothing).
The static router adds no bias.

The TTHA loss (update_ttha) carries gradient only through the routing probabilities the adapter controls:
each hardware term is (a constant over-target factor) x (expected cost under the soft routing: per-token
share x cost in batches, sum_e P(e activated) * c_e in decode; objective.py), plus a drift term KL(gate ||
routed) that keeps quality. The adapter and its loss run in numpy on the CPU (a few hundred parameters: a GPU
would spend its time on launches); stage() queues the step's one device-to-host copy.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ttha import kernels
from ttha.adapter import COST_FEATURES, HW_FEATURES, HostAdam, TTHAAdapter
from ttha.balance import ExpertLoadBalancer
from ttha.config import option
from ttha.costs import KernelCostModel, expert_op
from ttha.model import needs_grad, softmax_topk
from ttha.runtime import to_host_async
from ttha.objective import (GateWindow, cost_features, gate_activation_np, guard_scale, loss_autograd,
                            loss_closed_form, terms)

RATIO_CLAMP = 4.0  # hardware ratios are clamped so a wild reading cannot blow up the adapter input


def _reading(value) -> float:
    """A telemetry reading as a float; NaN/None (no sample yet, a failed read) counts as 0 = no strain."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def topk_route(logits: torch.Tensor, bias: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path: top-k of softmax(logits + bias) renormalised over the k chosen. Differentiable."""
    return softmax_topk(logits if bias is None else logits + bias, k)


class AdaptiveRouter:
    """Routes with gate logits + TTHA biases; records gate logits and expert usage per step. decode: the
    steps are decode steps (record_decode), whose cost is which experts they activate."""

    def __init__(self, n_experts: int, top_k: int, expert_bits, cost_model: KernelCostModel, router_cfg,
                 objective_cfg, targets_cfg, device=None, decode: bool = False):
        if not 1 <= int(top_k) <= int(n_experts):
            raise ValueError(f"top_k={top_k!r}: must be in 1..n_experts={n_experts}")
        bits = [int(b) for b in expert_bits]
        if len(bits) != n_experts:
            raise ValueError(f"expert_bits: expected {n_experts} entries, got {len(bits)}")
        self.n_experts, self.top_k, self.bits = int(n_experts), int(top_k), bits
        self.cost_model, self.decode = cost_model, bool(decode)
        self.device = torch.device(device if device is not None else "cpu")
        self.name = str(option(router_cfg, "name", "static"))
        self.adaptive = self.name == "ttha"
        self.cost_bias_scale = float(option(router_cfg, "cost_bias_scale", 0.0))
        self.max_bias = float(option(router_cfg, "max_bias", 6.0))
        self.activation_tau = float(option(router_cfg, "activation_tau", 0.1))  # logits: top-k's smoothing
        self.slope_span = float(option(router_cfg, "slope_span", 2.0))  # decode: the loss's secant, in logits
        drift = option(router_cfg, "max_drift", None)
        self.max_drift = None if drift is None else float(drift)
        if self.max_drift is not None and not self.max_drift >= 0:
            raise ValueError(f"router.max_drift={drift!r}: must be >= 0 (or null: no quality guard)")
        self.loss_tokens = int(option(router_cfg, "loss_tokens", 2048))
        self.loss_steps = int(option(router_cfg, "loss_steps", 8))
        for key in ("loss_tokens", "loss_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"router.{key}={getattr(self, key)!r}: must be >= 1")
        self._loss_window = GateWindow(self.loss_steps)  # decode: the gate records the loss reads
        self.obj = {k: float(option(objective_cfg, k, d)) for k, d in (
            ("task_weight", 1.0), ("power_weight", 1.0), ("thermal_weight", 1.0), ("latency_weight", 0.5),
            ("throughput_weight", 0.1), ("thermal_threshold_c", 75.0), ("thermal_boost", 2.0))}
        self.dynamic_thermal = bool(option(objective_cfg, "dynamic_thermal", True))
        self.targets = {k: float(option(targets_cfg, k, 0.0)) for k in ("power_w", "temp_c", "latency_ms")}
        for k, v in self.targets.items():
            if v <= 0:
                raise ValueError(f"targets.{k}={v!r}: must be > 0")
        self.balancer = ExpertLoadBalancer(self.n_experts, float(option(router_cfg, "balancer_alpha", 0.1)))

        self._cost_batch = None  # per-expert tokens the cost features were computed for
        per_expert = bool(option(router_cfg, "per_expert", False))  # config.validate checks it is a bool
        self._expert_id = np.eye(self.n_experts, dtype=np.float32)[:, :self.n_experts if per_expert else 0]
        self.cost_features = self._decode_cost_features() if self.decode else self._expert_cost_features(64.0)
        self.adapter = self.optimizer = None
        if self.adaptive:
            self.adapter = TTHAAdapter(len(COST_FEATURES) + self._expert_id.shape[1], len(HW_FEATURES),
                                       int(option(router_cfg, "adapter_hidden", 32)))
            self.optimizer = HostAdam(self.adapter.parameters(), float(option(router_cfg, "lr", 0.05)))
            self._adapter_params = list(self.adapter.parameters())
        self._bias: torch.Tensor | None = None
        self._bias_np: np.ndarray | None = None  # its host copy, for the records
        self._zero_bias: torch.Tensor | None = None  # the static router's bias on the kernel path
        self._logits: dict[int, torch.Tensor] = {}
        self._counts = torch.zeros(self.n_experts, dtype=torch.long, device=self.device)
        self._folded = True
        self._usage: torch.Tensor | None = None
        self._staged_counts: torch.Tensor | None = None  # this step's expert counts [E], on the host
        self._staged_probs = None  # (gate probs [E, N] on the host, layers), for the next update
        self._gate_q: tuple | None = None  # (the last gate probs [E, N] seen, layers): the guard's reference
        self._alpha = 1.0  # the guard's scale of this step's bias
        self._prepared: tuple | None = None  # prepare_bias's (alpha, bias [E] on the host, on the device)
        self._idle: tuple = (None, None)  # (gate record q, its P(e idle)) in decode

    # ---- costs and features ------------------------------------------------------------------------
    def _features(self, costs) -> torch.Tensor:
        self.cost_features, self._loss_np = cost_features(costs, self.decode)  # CPU, like the adapter
        self._cost_np = self.cost_features.numpy()
        self._adapter_np = np.concatenate([self._cost_np, self._expert_id], 1)  # the adapter's expert inputs
        return self.cost_features

    def _expert_cost_features(self, tokens_per_expert: float) -> torch.Tensor:
        """Per-token costs of each expert at this per-expert batch (the batch workloads)."""
        tokens_per_expert = max(1.0, float(tokens_per_expert))
        if self._cost_batch == tokens_per_expert:
            return self.cost_features
        costs = [self.cost_model.get_cost(expert_op(b), tokens_per_expert) for b in self.bits]
        self._cost_batch = tokens_per_expert
        return self._features(costs)

    def _decode_cost_features(self) -> torch.Tensor:
        """Per-activation costs (decode): what an expert adds to a step when it serves one token, i.e. one read
        of its weights (the cost model's grouped decode table; the per-expert op where it has none)."""
        reader = getattr(self.cost_model, "decode_cost", None)
        return self._features([reader(b, 1) if reader else self.cost_model.get_cost(expert_op(b), 1)
                               for b in self.bits])

    def over_target(self, sample, latency_ms: float) -> dict[str, float]:
        """How far each reading is over its target, >= 0 (0 at or under target)."""
        return {"power": max(0.0, _reading(sample.power_w) / self.targets["power_w"] - 1.0),
                "temp": max(0.0, _reading(sample.temp_c) / self.targets["temp_c"] - 1.0),
                "latency": max(0.0, _reading(latency_ms) / self.targets["latency_ms"] - 1.0)}

    def thermal_weight(self, temp_c: float) -> float:
        """Thermal weight, raised linearly above the threshold when dynamic_thermal is on."""
        excess = _reading(temp_c) - self.obj["thermal_threshold_c"]
        boost = self.obj["thermal_boost"] * excess / 10.0 if self.dynamic_thermal and excess > 0 else 0.0
        return self.obj["thermal_weight"] * (1.0 + boost)

    def _hw_np(self, sample, latency_ms: float) -> np.ndarray:
        t = self.targets
        ratios = [_reading(sample.power_w) / t["power_w"], _reading(sample.temp_c) / t["temp_c"],
                  _reading(getattr(sample, "util_pct", 0.0)) / 100.0, _reading(latency_ms) / t["latency_ms"]]
        over = [min(v, RATIO_CLAMP) for v in self.over_target(sample, latency_ms).values()]
        return np.array([min(max(r, 0.0), RATIO_CLAMP) for r in ratios] + over, dtype=np.float32)

    def _cost_bias_np(self, strain: dict[str, float], idle=None) -> np.ndarray:
        """-scale x (energy strain x energy_e + latency strain x latency_e) [x idle_e in decode]: [E], 0 unstrained."""
        k = -self.cost_bias_scale
        bias = self._cost_np[:, :2] @ np.array([k * strain["latency"], k * (strain["power"] + strain["temp"])],
                                               dtype=np.float32)
        return bias if idle is None else (bias * idle).astype(np.float32)

    def _raw_bias_np(self, sample, latency_ms: float, idle=None):
        """(clamped adapter + cost bias [E], the adapter's saved forward or None), before the guard."""
        bias, saved = self._cost_bias_np(self.over_target(sample, latency_ms), idle), None
        if self.adaptive:
            adapter_bias, saved = self.adapter.forward_np(self._adapter_np, self._hw_np(sample, latency_ms))
            bias = bias + adapter_bias
        return np.clip(bias - bias.mean(), -self.max_bias, self.max_bias), saved

    def _step_bias(self, sample, latency_ms: float, gate: tuple | None):
        """(guard scale alpha, clamped bias before the guard [E], the adapter's saved forward, decode idle
        factors) for gate probabilities gate = (q [E, N], layers): the last record when a step is routed (None:
        none yet), the step's own in the loss."""
        q, layers = gate if gate is not None else (None, None)
        idle = None
        if self.decode:  # P(e idle) under the gate alone, averaged over the layers; unknown: every expert idle
            if q is not None and self._idle[0] is not q:  # steps route by one record until the next update
                self._idle = (q, 1.0 - gate_activation_np(q, layers, self.top_k, self.activation_tau))
            idle = np.ones(self.n_experts, dtype=np.float32) if q is None else self._idle[1]
        raw, saved = self._raw_bias_np(sample, latency_ms, idle)
        return guard_scale(q, raw, self.max_drift), raw, saved, idle

    # ---- the routing callable ----------------------------------------------------------------------
    def begin_step(self, sample, latency_ms: float) -> None:
        """Start a step: fold the last step's usage into the balancer, clear the records, apply the bias
        prepare_bias computed, else compute it from these readings (no grad)."""
        self._fold()
        self._logits, self._usage, self._staged_counts = {}, None, None
        self._counts.zero_()
        if not self.adaptive:
            self._bias, self._bias_np = None, None
            return
        if self._prepared is None:
            self.prepare_bias(sample, latency_ms)
        (self._alpha, self._bias_np, self._bias), self._prepared = self._prepared, None

    def prepare_bias(self, sample, latency_ms: float) -> None:
        """Compute the next step's bias now, from these readings and the newest gate record; the next begin_step
        applies it. Decode serving calls it while the GPU runs the replay before, which hides this host work."""
        if not self.adaptive:
            return
        if self._staged_probs is not None:  # a staged record not yet learned from is the newest gate record
            self._gate_q = (self._staged_probs[0].numpy(), self._staged_probs[1])
        alpha, raw, _, _ = self._step_bias(sample, latency_ms, self._gate_q)
        bias_np = (alpha * raw).astype(np.float32)
        bias = torch.from_numpy(bias_np)
        # from pinned memory, queued: a synchronous copy waits for the GPU, which another process (the
        # stressor) may hold for a time slice
        bias = bias.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else bias
        self._prepared = (alpha, bias_np, bias)

    def __call__(self, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 2 or logits.shape[-1] != self.n_experts:
            raise ValueError(f"logits: expected [T, {self.n_experts}], got {list(logits.shape)}")
        bias = self._bias
        if bias is not None and bias.device != logits.device:
            bias = self._bias = bias.to(logits.device)
        if not needs_grad(logits) and kernels.use_triton(logits):
            if bias is None:
                if self._zero_bias is None or self._zero_bias.device != logits.device:
                    self._zero_bias = torch.zeros(self.n_experts, device=logits.device)
                bias = self._zero_bias
            weights, indices = kernels.topk_router(logits.float(), bias, self.top_k)
        else:
            weights, indices = topk_route(logits.float(), bias, self.top_k)
        # One record per layer per step: the serving (prequential) forward; a TTT forward of the same
        # batch routes the same tokens again and must not double the usage or the loss.
        if layer not in self._logits:
            flat = indices.flatten()  # index_add_, not bincount: bincount syncs the GPU to size its output
            counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device)
            self._record(layer, logits, counts.index_add_(0, flat, torch.ones_like(flat)))
            if not self.decode:
                self._update_cost_batch(logits.shape[0])
        return weights, indices

    def _record(self, layer: int, logits: torch.Tensor, counts: torch.Tensor) -> None:
        self._logits[layer] = logits.detach().float()
        if self._counts.device != counts.device:
            self._counts = self._counts.to(counts.device)
        self._counts += counts.to(self._counts.dtype)
        self._folded, self._usage = False, None

    def record_decode(self, gate_logits: torch.Tensor, counts: torch.Tensor) -> None:
        """Record a decode step routed elsewhere (ttha.decode.Decoder): its gate logits [L, B, E] and per-layer
        expert counts [L, E], as the routing callable records a forward; layers already recorded are kept."""
        if gate_logits.dim() != 3 or gate_logits.shape[-1] != self.n_experts or counts.shape != (
                gate_logits.shape[0], self.n_experts):
            raise ValueError(f"record_decode: expected gate logits [L, B, {self.n_experts}] and counts "
                             f"[L, {self.n_experts}], got {list(gate_logits.shape)} and {list(counts.shape)}")
        for layer in range(gate_logits.shape[0]):
            if layer not in self._logits:
                self._record(layer, gate_logits[layer], counts[layer])

    def _update_cost_batch(self, tokens: int) -> None:
        per_expert = float(2 ** round(math.log2(max(1.0, tokens * self.top_k / self.n_experts))))
        if per_expert != self._cost_batch:  # batch size changed: costs per token at the new operating point
            self._expert_cost_features(per_expert)

    # ---- statistics --------------------------------------------------------------------------------
    def usage(self) -> torch.Tensor:
        """Share of routed tokens per expert in the current step (all layers), [E] float64 on the CPU."""
        if self._usage is None:  # one device-to-host copy per step, however often it is asked
            counts = (self._staged_counts if self._staged_counts is not None else self._counts).cpu().numpy()
            total = int(counts.sum())
            self._usage = counts / total if total > 0 else np.full(self.n_experts, 1.0 / self.n_experts)
        return torch.from_numpy(self._usage.astype(np.float64))

    def _fold(self) -> None:
        if not self._folded:
            self.usage()
            self.balancer.update(self._usage)
            self._folded = True

    @property
    def balance_score(self) -> float:
        self._fold()
        return self.balancer.balance_score

    @property
    def bias(self) -> torch.Tensor:
        """Per-expert bias applied in this step, on the CPU (zeros for the static router)."""
        return torch.zeros(self.n_experts) if self._bias_np is None else torch.from_numpy(self._bias_np.copy())

    def bias_columns(self) -> dict[str, float]:
        """This step's applied bias per expert and the guard's scale, as record columns (host copy: no sync)."""
        return {} if self._bias_np is None else {"router/guard_scale": float(self._alpha), **{
            f"router/bias_{e}": float(b) for e, b in enumerate(self._bias_np)}}

    @property
    def device_bias(self) -> torch.Tensor | None:
        """This step's bias [E] where routing runs (None: no bias), for a decoder that routes by itself."""
        return self._bias

    @property
    def guard_scale(self) -> float:
        """The quality guard's scale of this step's bias (1: the bias as learned, 0: routed as the gate)."""
        return float(self._alpha)

    # ---- the TTHA loss -----------------------------------------------------------------------------
    def _subsampled_logits(self) -> torch.Tensor:
        """This step's gate logits of all layers (layer-major), at most loss_tokens rows (strided) except in
        decode (the loss needs each layer's tokens of the step), on the routing device."""
        if not self._logits:
            raise RuntimeError("update_ttha: no gate logits recorded this step (call the model after begin_step)")
        logits = torch.cat([self._logits[k] for k in sorted(self._logits)], dim=0)  # [L*T, E]
        if logits.shape[0] > self.loss_tokens and not self.decode:  # strided: every layer and position range
            step = logits.shape[0] / self.loss_tokens
            rows = (torch.arange(self.loss_tokens, device=logits.device) * step).long()
            logits = logits.index_select(0, rows)
        return logits

    def stage(self, for_update: bool = True) -> None:
        """Queue this step's device-to-host copies without waiting: the expert counts and, for_update, the
        gate's routing probabilities on the subsampled rows (their softmax runs where the logits are: one
        kernel on a GPU). Call it before the step's own sync (the prequential loss read), which completes
        them: neither usage() nor the next update_ttha (which reads the staged probabilities) adds a GPU sync
        or waits for work queued after the loss read (the TTT step)."""
        if not self._logits:
            return
        probs = self._gate_probs_on_device() if for_update else None
        self._staged_counts = to_host_async(self._counts) if self._counts.is_cuda else self._counts.clone()
        if probs is not None:
            self._staged_probs = (to_host_async(probs) if probs.is_cuda else probs, len(self._logits))

    def _gate_probs_on_device(self) -> torch.Tensor:
        """q = softmax(gate logits) of the subsampled rows, experts-major [E, N] contiguous."""
        return torch.softmax(self._subsampled_logits(), dim=-1).t().contiguous()

    def _gate_probs(self) -> tuple[np.ndarray, int]:
        """(q [E, N] on the CPU, layers): the last staged record (consumed), else this step's records."""
        staged, self._staged_probs = self._staged_probs, None
        if staged is None:
            staged = (self._gate_probs_on_device().cpu(), len(self._logits))
        self._gate_q = (staged[0].numpy(), staged[1])  # also the guard's reference for the next steps
        return self._gate_q

    def _term_weights(self, sample, latency_ms: float) -> np.ndarray:
        """[3, 4]: expected (latency, energy, throughput) -> (power, temp, latency, throughput_bonus) terms.
        Each hardware term = objective weight x over-target factor (a constant >= 0) x expected cost."""
        strain, o = self.over_target(sample, latency_ms), self.obj
        return np.array([[0.0, 0.0, o["latency_weight"] * strain["latency"], 0.0],
                         [o["power_weight"] * strain["power"], self.thermal_weight(sample.temp_c) * strain["temp"],
                          0.0, 0.0],
                         [0.0, 0.0, 0.0, o["throughput_weight"]]], dtype=np.float32)

    def ttha_loss(self, sample, latency_ms: float, task_loss: float) -> dict[str, torch.Tensor]:
        """The loss terms of this step's gate logits as an autograd graph (the reference for update_ttha): 'total'
        carries gradient to the adapter through p = softmax(logits + bias), the bias before the quality guard
        (scaled inside the loss, the learned bias would grow without end while its applied part sits on the bound)."""
        logits = self._subsampled_logits().cpu()
        layers = len(self._logits)
        q = torch.softmax(logits, -1).t().numpy()
        idle = self._step_bias(sample, latency_ms, (q, layers))[3]
        if self.decode:  # a gate's log-probabilities are its logits up to a per-token shift
            q, layers = self._loss_window.read(q, layers, keep=False)
            logits = torch.from_numpy(np.log(np.maximum(q.T, 1e-38)))
        bias = torch.from_numpy(self._cost_bias_np(self.over_target(sample, latency_ms), idle))
        if self.adaptive:
            hw_features = torch.from_numpy(self._hw_np(sample, latency_ms))
            bias = bias + self.adapter(torch.from_numpy(self._adapter_np), hw_features)
        bias = (bias - bias.mean()).clamp(-self.max_bias, self.max_bias)
        hw, drift = loss_autograd(logits, bias, torch.from_numpy(self._loss_np),
                                  self._term_weights(sample, latency_ms), self.obj["task_weight"],
                                  layers if self.decode else None, self.top_k, self.activation_tau)
        return terms(torch.tensor(float(task_loss)), hw, drift)

    def update_ttha(self, sample, latency_ms: float, task_loss: float) -> dict[str, float]:
        """One Adam step of the adapter on the TTHA loss of the last routing staged by stage(), or of this
        step's recorded routing when none is staged; no model forward. Returns the terms as floats. The static
        router computes the terms and learns nothing. sample and latency_ms are the readings the staged step
        was routed under. Same values as ttha_loss, in closed form from the gate probabilities
        (objective.loss_closed_form), in numpy; its gradient too, but in decode with slope_span > 0 its secant."""
        q, layers = self._gate_probs()
        raw, saved = self._step_bias(sample, latency_ms, (q, layers))[1:3]
        if self.decode:
            q, layers = self._loss_window.read(q, layers, keep=True)
        values, drift, grad = loss_closed_form(q, raw, self._loss_np,
                                               self._term_weights(sample, latency_ms), self.obj["task_weight"],
                                               layers if self.decode else None, self.top_k, self.activation_tau,
                                               self.slope_span)
        if self.adaptive:
            grad = grad * (np.abs(raw) < self.max_bias)  # none through the clamp
            grad = (grad - grad.mean()).astype(np.float32)  # through the centering
            grads = self.adapter.grads_np(saved, grad)
            for param, g in zip(self._adapter_params, grads):  # inspectable, as after backward()
                param.grad = torch.from_numpy(g)
            self.optimizer.step(grads)
        return terms(float(task_loss), values, drift)
