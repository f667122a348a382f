"""The TTHA adapter: a small MLP from expert cost features and hardware features to a per-expert routing
bias, learned online by AdaptiveRouter (routing.py), with its forward, backward and Adam step in numpy.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

COST_FEATURES = ("latency", "energy", "throughput")  # per expert, each normalised to [0, 1]
HW_FEATURES = ("power/target", "temp/target", "util", "latency/target",
               "power_over", "temp_over", "latency_over")


class TTHAAdapter(nn.Module):
    """Per-expert bias from cost features [E, C] and hardware features [H]: a small MLP shared by the
    experts (so it generalises over cost levels), last layer zero-initialised so it starts neutral."""

    def __init__(self, n_cost_features: int = len(COST_FEATURES), n_hw_features: int = len(HW_FEATURES),
                 hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_cost_features + n_hw_features, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self._np_cache: list[np.ndarray] | None = None

    def numpy_params(self) -> list[np.ndarray]:
        """Views of the (CPU) parameters in parameters() order, made once: parameters() walks the module
        tree on every call. In-place updates through them change the module."""
        if self._np_cache is None:
            self._np_cache = [p.detach().numpy() for p in self.parameters()]
        return self._np_cache

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: new storage, so new views
        self._np_cache = None
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def inputs(cost_features: torch.Tensor, hw_features: torch.Tensor) -> torch.Tensor:
        return torch.cat([cost_features, hw_features.expand(cost_features.shape[0], -1)], dim=-1)

    def forward(self, cost_features: torch.Tensor, hw_features: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(cost_features, hw_features)).squeeze(-1)

    def forward_np(self, cost_features: np.ndarray, hw_features: np.ndarray):
        """(bias [E], what grads_np needs): the same forward in numpy on the parameters' memory. The
        router's per-step host math runs in numpy: for [E, 10] -> 32 -> 1 torch's per-op overhead and
        autograd cost several times the arithmetic (tests check both against autograd)."""
        w1, b1, w2, b2 = self.numpy_params()
        x = np.concatenate([cost_features, np.broadcast_to(hw_features, (len(cost_features), len(hw_features)))], 1)
        h = np.tanh(x @ w1.T + b1)
        return h @ w2[0] + b2[0], (x, h)

    def grads_np(self, saved, grad_bias: np.ndarray) -> list[np.ndarray]:
        """d loss / d parameters (in parameters() order) for d loss / d bias = grad_bias [E]."""
        (x, h), w2 = saved, self.numpy_params()[2]
        dz = np.outer(grad_bias, w2[0]) * (1 - h * h)
        return [dz.T @ x, dz.sum(0), (grad_bias @ h)[None, :], np.array([grad_bias.sum()], dtype=grad_bias.dtype)]


class HostAdam:
    """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no weight decay) in numpy, on views of CPU
    parameters: for the adapter's few hundred parameters torch's optimizer step is mostly Python overhead,
    more than the update's math (tests check it step for step against torch.optim.Adam)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p.detach().numpy() for p in params]  # views: updated in place, seen by the module
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), betas, eps
        self.exp_avg = [np.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [np.zeros_like(p) for p in self.params]
        self.steps = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.steps += 1
        step_size = self.lr / (1 - self.beta1 ** self.steps)
        bias_correction2_sqrt = math.sqrt(1 - self.beta2 ** self.steps)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m += (1 - self.beta1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p -= step_size * m / (np.sqrt(v) / bias_correction2_sqrt + self.eps)
