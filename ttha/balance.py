"""How evenly a router spreads its tokens over the experts: an EMA of the per-expert shares and its entropy."""
from __future__ import annotations

import math

import numpy as np
import torch


class ExpertLoadBalancer:
    """EMA of the per-expert share of routed tokens. balance_score = normalised entropy of the EMA:
    1 for uniform load, 0 when one expert takes everything. numpy: a few values a step, where torch's
    per-op overhead would outweigh the arithmetic."""

    def __init__(self, n_experts: int, alpha: float = 0.1):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"balancer_alpha={alpha!r}: must be in (0, 1]")
        self.n_experts, self.alpha = n_experts, float(alpha)
        self.ema = np.full(n_experts, 1.0 / n_experts)
        self.updates = 0

    def update(self, shares) -> None:
        shares = np.asarray(shares.detach().cpu() if torch.is_tensor(shares) else shares, dtype=np.float64).ravel()
        if shares.size != self.n_experts:
            raise ValueError(f"shares: expected {self.n_experts} values, got {shares.size}")
        total = float(shares.sum())
        if total <= 0:
            return
        shares = shares / total
        # the first observation replaces the uniform prior instead of being smoothed into it
        self.ema = shares.copy() if self.updates == 0 else (1 - self.alpha) * self.ema + self.alpha * shares
        self.updates += 1

    @property
    def balance_score(self) -> float:
        if self.n_experts == 1:
            return 1.0
        p = np.maximum(self.ema, 0.0)
        entropy = -float((p * np.log(np.maximum(p, 1e-12))).sum())
        return max(0.0, min(1.0, entropy / math.log(self.n_experts)))
