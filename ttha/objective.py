"""The math of the TTHA objective that routing.py applies: the expected-activation cost of a decode step and
the quality guard (a bound on how far the router's bias may move routing from what the gate wants).

Expected activation. In decode an expert's weights are read once per step if it gets at least one token, so
a step costs sum_e P(e activated) * c_e. Top-k routing is taken as k draws per token from the routing
probabilities p_te, so token t leaves expert e unused with probability (1 - p_te)^k and
    P(e activated) = 1 - prod_t (1 - p_te)^k = -expm1(k * sum_t log1p(-p_te)).
The log1p/expm1 form keeps P accurate when every p_te is tiny (1 - prod(...) cancels to 0 there). Its
gradient, k (1 - p_te)^(k-1) prod_{s != t} (1 - p_se)^k, is computed from products that leave out one token
(prefix and suffix cumulative products), so it is exact at p = 1, where the log form divides by zero.

Quality guard. The bias b applied to the gate logits moves routing from the gate's probabilities q to
p = softmax(log q + b). Its cost in quality is measured by the mean KL(q || p) over the step's tokens; the
guard scales the bias by the largest alpha in [0, 1] with KL(q || softmax(log q + alpha b)) <= max_drift.
KL is 0 at alpha = 0 with zero slope and convex in alpha, so it rises monotonically and a bisection finds alpha.
"""
from __future__ import annotations

import numpy as np
import torch

GUARD_GRID, GUARD_ROUNDS = 64, 3  # alpha found on a grid of 64, refined twice: within 64**-3 = 4e-6 of the bound


def _idle_excluding_each(idle: torch.Tensor | np.ndarray, dim: int):
    """prod over dim of idle, leaving out each entry in turn (exact with zeros): prefix x suffix products."""
    if torch.is_tensor(idle):
        ones = torch.ones_like(idle.narrow(dim, 0, 1))
        prefix = torch.cumprod(torch.cat([ones, idle.narrow(dim, 0, idle.shape[dim] - 1)], dim), dim)
        suffix = torch.cumprod(torch.cat([ones, idle.flip(dim).narrow(dim, 0, idle.shape[dim] - 1)], dim),
                               dim).flip(dim)
        return prefix * suffix
    ones = np.ones_like(np.take(idle, [0], axis=dim))
    n = idle.shape[dim]
    prefix = np.cumprod(np.concatenate([ones, np.take(idle, range(n - 1), axis=dim)], dim), dim)
    suffix = np.flip(np.cumprod(np.concatenate([ones, np.take(np.flip(idle, dim), range(n - 1), axis=dim)],
                                               dim), dim), dim)
    return prefix * suffix


def activation_np(p: np.ndarray, draws: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(P(e activated) [..., E], d P / d p [..., T, E]) for routing probabilities p [..., T, E]."""
    k = int(draws)
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf: an expert some token surely takes is surely activated
        activated = -np.expm1(k * np.log1p(-p).sum(-2))
    one_minus = 1.0 - p
    others = _idle_excluding_each(one_minus ** k, p.ndim - 2)
    return activated, k * one_minus ** (k - 1) * others


class _ExpectedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, draws: int) -> torch.Tensor:
        p = p.clamp(0.0, 1.0)
        ctx.save_for_backward(p)
        ctx.draws = draws
        return -torch.expm1(draws * torch.log1p(-p).sum(-2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,), k = ctx.saved_tensors, ctx.draws
        one_minus = 1.0 - p
        others = _idle_excluding_each(one_minus ** k, p.dim() - 2)
        return grad.unsqueeze(-2) * k * one_minus ** (k - 1) * others, None


def expected_activation(p: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """P(e activated) [..., E] from routing probabilities p [..., T, E] (T = the tokens of one decode step,
    draws = top-k), differentiable through p (exact gradient at p = 0 and p = 1)."""
    if p.dim() < 2:
        raise ValueError(f"p: expected [..., tokens, experts], got shape {list(p.shape)}")
    return _ExpectedActivation.apply(p, int(draws))


def expected_cost(p: torch.Tensor, cost: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """E[cost] = sum_e P(e activated) * c_e for p [..., T, E] and per-activation costs c [E]."""
    return expected_activation(p, draws) @ cost


def cost_features(costs, decode: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """(the adapter's cost features [E, 3], what the loss weighs [E, 3]) from each expert's cost model Cost:
    latency, energy (latency when unknown), throughput, each divided by its maximum. In decode the loss's
    throughput column is -latency: the bonus rewards a shorter expected read time of the experts a step
    activates (its tokens/s), not activating fast experts."""
    lat = torch.tensor([max(c.latency_ms, 1e-9) for c in costs], dtype=torch.float32)
    energy = (lat.clone() if any(c.energy_j is None for c in costs)
              else torch.tensor([c.energy_j for c in costs], dtype=torch.float32))
    tput = 1.0 / lat
    feats = torch.stack([lat / lat.max(), energy / energy.max().clamp_min(1e-30), tput / tput.max()], dim=-1)
    f = feats.numpy()
    return feats, (np.stack([f[:, 0], f[:, 1], -f[:, 0]], 1) if decode else f)


# ---------------------------------------------------------------------------------------------- quality guard

def drift_np(q: np.ndarray, bias: np.ndarray) -> float | np.ndarray:
    """Mean over tokens of KL(q || softmax(log q + bias)) for gate probabilities q [E, N] (experts-major); bias
    [E], or [J, E] for J drifts at once ([J])."""
    b = np.atleast_2d(bias.astype(np.float64))
    b_max = b.max(1)
    s = np.exp(b - b_max[:, None]) @ q  # [J, N]
    d = np.log(np.maximum(s, 1e-300)).mean(1) + b_max - b @ q.mean(1)
    return float(d[0]) if bias.ndim == 1 else d


def guard_scale(q: np.ndarray | None, bias: np.ndarray, max_drift: float | None) -> float:
    """The largest alpha in [0, 1] with drift_np(q, alpha * bias) <= max_drift. No gate record yet (q None):
    0, route as the gate does until its distribution is known. max_drift None or no bias: 1. The drift grows
    with alpha, so a grid of alphas, refined between the last within the budget and the next, finds it: three
    matrix products where a bisection would take forty (it runs twice a decode replay, on the host)."""
    if max_drift is None or not np.any(bias):
        return 1.0
    if q is None:
        return 0.0
    q = q.astype(np.float64)
    if drift_np(q, bias) <= max_drift:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(GUARD_ROUNDS):
        alphas = np.linspace(lo, hi, GUARD_GRID + 1)
        within = np.flatnonzero(drift_np(q, alphas[:, None] * bias) <= max_drift)  # alphas[0] always is
        i = int(within[-1]) if within.size else 0
        lo, hi = alphas[i], alphas[min(i + 1, GUARD_GRID)]
    return float(lo)


# ---------------------------------------------------------------------------------------------- the TTHA loss

def terms(task, hw, drift) -> dict:
    """The named loss terms from the task loss, the four weighted hardware terms and the drift (tensors or
    floats); the throughput bonus is subtracted."""
    return {"task": task, "power": hw[0], "temp": hw[1], "latency": hw[2], "throughput_bonus": hw[3],
            "drift": drift, "total": task + hw[0] + hw[1] + hw[2] - hw[3] + drift}


def loss_autograd(logits: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, weights: np.ndarray,
                  task_weight: float, layers: int | None = None, draws: int = 1):
    """(weighted hardware terms [4], drift) as an autograd graph through bias, for gate logits [N, E].
    layers None: per-token expected cost (mean routed share x feats); else decode: the N rows are `layers`
    layers' tokens of one step (layer-major) and the expected cost is sum_e P(e activated) x feats, averaged
    over the layers. The reference that loss_closed_form is tested against."""
    log_p = torch.log_softmax(logits + bias, dim=-1)
    p = log_p.exp()
    share = p.mean(0) if layers is None else expected_activation(p.reshape(layers, -1, p.shape[-1]),
                                                                 draws).mean(0)
    log_q = torch.log_softmax(logits, dim=-1)  # what the gate wants
    drift = task_weight * (log_q.exp() * (log_q - log_p)).sum(-1).mean()  # KL(gate || routed)
    return (share @ feats) @ torch.from_numpy(weights), drift


def loss_closed_form(q: np.ndarray, bias: np.ndarray, feats: np.ndarray, weights: np.ndarray,
                     task_weight: float, layers: int | None = None, draws: int = 1):
    """(hardware terms [4] and drift as floats, d total / d bias [E]) of loss_autograd, in numpy from the gate
    probabilities q [E, N] (experts-major). With e_i = exp(b_i - max b), S_n = sum_i q_in e_i,
    p_in = q_in e_i / S_n = softmax(logits + b), and c = feats @ (weights @ [1, 1, 1, -1]) (the per-expert
    cost of the weighted terms, throughput bonus negative):
        drift = task_weight * (mean_n log S_n + max b - b . q_bar),  d drift / d b = task_weight (p_bar - q_bar)
        per token: cost = p_bar . c,  d / d b = p_bar * c - mean_n p_n (p_n . c)
                   with mean_n p_n (p_n . c) = e * mean_n(q_n (e c) . q_n / S_n^2) (q touched in matrix products)
        decode:    cost = mean_l A_l . c,  d / d b_i = sum_n p_in (g_in - g_n . p_n),  g = c * dA / dp / layers."""
    b_max = bias.max()
    e = np.exp(bias - b_max)
    c = feats @ (weights @ np.array([1.0, 1.0, 1.0, -1.0], dtype=np.float32))
    s = e @ q  # [N]
    q_bar = q.mean(1)
    drift = task_weight * (float(np.log(s).mean()) + float(b_max) - float(bias @ q_bar))
    if layers is None:
        r = 1.0 / s
        cols = np.stack([r, ((e * c) @ q) * r * r], axis=1)
        moments = (q @ cols) / q.shape[1]  # [E, 2]: mean_n q/S, mean_n q (ec.q)/S^2
        share = p_bar = e * moments[:, 0]
        grad = p_bar * c - e * moments[:, 1]
    else:
        p = (q * e[:, None] / s).T  # [N, E], layer-major rows
        p_bar = p.mean(0)
        activated, d_act = activation_np(p.reshape(layers, -1, len(e)), draws)
        share = activated.mean(0)
        g = (d_act * (c / layers)).reshape(p.shape)
        grad = (p * (g - (g * p).sum(1, keepdims=True))).sum(0)
    values = [float(v) for v in (share @ feats) @ weights]
    return values, drift, grad + task_weight * (p_bar - q_bar)
