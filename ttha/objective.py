"""The math of the TTHA objective that routing.py applies: the expected-activation cost of a decode step and
the quality guard (a bound on how far the router's bias may move routing from what the gate wants).

Expected activation. In decode an expert's weights are read once per step if it gets at least one token, so
a step costs sum_e P(e activated) * c_e with
    P(e activated) = 1 - prod_t (1 - p_te) = -expm1(sum_t log1p(-p_te)),
p_te the probability that token t routes to e. Routing is a deterministic top-k of the routed logits z, so p_te
is a smoothed top-k inclusion, sigmoid((z_te - theta_t) / tau), theta_t halfway between the token's k-th and
(k+1)-th largest logit: with tau small against the gate's logit gaps it is the 0/1 of top-k. Reading the
softmax probabilities as k draws instead (1 - (1 - p)^k) calls an expert that every token gives a few percent
almost surely activated: on a concentrated gate that is most experts, the loss then sees nothing to save on
them and learns to move tokens onto them. The log1p/expm1 form keeps P accurate when every p_te is tiny; its
gradient, prod_{s != t} (1 - p_se), is computed from products that leave out one token (prefix and suffix
cumulative products), so it is exact at p = 1, where the log form divides by zero.

The decode cost is not convex in the bias: an expert every step reads costs nothing more for more tokens, so its
local slope says to move tokens onto whatever experts are read anyway (on a gate that reads its 16-bit experts
in most steps, onto those) and never sees the saving of leaving an expensive expert idle. With span > 0 the
loss's slope in each expert's bias is the secant over +-span logits of the total, which sees that saving.

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


def topk_inclusion(z: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """P(e in token t's top-k) [..., T, E], smoothed, for routed logits z [..., T, E]: sigmoid((z - theta) / tau),
    theta halfway between each token's k-th and (k+1)-th largest logit (differentiable through both)."""
    if k >= z.shape[-1]:
        return torch.ones_like(z)
    theta = torch.topk(z, k + 1, dim=-1).values[..., k - 1:].mean(-1, keepdim=True)
    return torch.sigmoid((z - theta) / tau)


def topk_inclusion_np(z: np.ndarray, k: int, tau: float):
    """topk_inclusion in numpy for z [..., E]: (inclusion [..., E], its slope d/dz_te with theta held [..., E], the
    two experts theta sits between [..., 2]); theta moves by half the change of either one's logit."""
    if k >= z.shape[-1]:
        return np.ones_like(z), np.zeros_like(z), np.zeros(z.shape[:-1] + (0,), dtype=np.int64)
    edge = np.argsort(-z, axis=-1, kind="stable")[..., k - 1:k + 1]
    theta = np.take_along_axis(z, edge, -1).mean(-1, keepdims=True)
    inclusion = 0.5 * (1.0 + np.tanh((z - theta) / (2.0 * tau)))  # sigmoid without overflow
    return inclusion, inclusion * (1.0 - inclusion) / tau, edge


class GateWindow:
    """The gate records of a decode router's last updates. One step's tokens count the experts a bias would
    activate noisily: the loss reads the last `steps` records (this update's and those before it), each under
    the current bias (the gate's probabilities do not depend on the bias)."""

    def __init__(self, steps: int):
        self.steps, self.records = int(steps), []

    def read(self, q: np.ndarray, layers: int, keep: bool) -> tuple[np.ndarray, int]:
        """(gate probs [E, N'] of the records before q and q, oldest first; their layers); keep: q joins them."""
        earlier = self.records[len(self.records) - self.steps + 1:]
        if keep:
            self.records = earlier + [q]
        return np.concatenate(earlier + [q], axis=1), layers * (len(earlier) + 1)


def gate_activation_np(q: np.ndarray, layers: int, k: int, tau: float) -> np.ndarray:
    """P(e activated) [E] under the gate alone, averaged over the layers, from gate probabilities q [E, N]
    (layer-major rows): the log of a probability is its logit up to a per-token shift, which top-k ignores."""
    return _decode_activation(np.log(np.maximum(q.T, 1e-38)), np.zeros((1, q.shape[0])), layers, k, tau)[0]


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
                  task_weight: float, layers: int | None = None, top_k: int = 1, tau: float = 0.1):
    """(weighted hardware terms [4], drift) as an autograd graph through bias, for gate logits [N, E].
    layers None: per-token expected cost (mean routed share x feats); else decode: the N rows are `layers`
    layers' tokens of one step (layer-major) and the expected cost is sum_e P(e activated) x feats (top-k
    inclusion at temperature tau), averaged over the layers. The reference loss_closed_form is tested against."""
    log_p = torch.log_softmax(logits + bias, dim=-1)
    p = log_p.exp()
    if layers is None:
        share = p.mean(0)
    else:
        inclusion = topk_inclusion(logits + bias, top_k, tau)
        share = expected_activation(inclusion.reshape(layers, -1, p.shape[-1])).mean(0)
    log_q = torch.log_softmax(logits, dim=-1)  # what the gate wants
    drift = task_weight * (log_q.exp() * (log_q - log_p)).sum(-1).mean()  # KL(gate || routed)
    return (share @ feats) @ torch.from_numpy(weights), drift


def loss_closed_form(q: np.ndarray, bias: np.ndarray, feats: np.ndarray, weights: np.ndarray,
                     task_weight: float, layers: int | None = None, top_k: int = 1, tau: float = 0.1,
                     span: float = 0.0):
    """(hardware terms [4] and drift as floats, d total / d bias [E]) of loss_autograd, in numpy from the gate
    probabilities q [E, N] (experts-major). With e_i = exp(b_i - max b), S_n = sum_i q_in e_i,
    p_in = q_in e_i / S_n = softmax(logits + b), and c = feats @ (weights @ [1, 1, 1, -1]) (the per-expert
    cost of the weighted terms, throughput bonus negative):
        drift = task_weight * (mean_n log S_n + max b - b . q_bar),  d drift / d b = task_weight (p_bar - q_bar)
        per token: cost = p_bar . c,  d / d b = p_bar * c - mean_n p_n (p_n . c)
                   with mean_n p_n (p_n . c) = e * mean_n(q_n (e c) . q_n / S_n^2) (q touched in matrix products)
        decode:    cost = mean_l A_l . c, A from the inclusions s_n = sigmoid((log q_n + b - theta_n) / tau):
                   d / d b_i = sum_n (h_ni - [i is one of the two experts theta_n sits between] h_n . 1 / 2),
                   h = c * dA / ds * ds / dz / layers;
                   span > 0: d / d b_i = (total(b + span u_i) - total(b - span u_i)) / (2 span) instead."""
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
        z = np.log(np.maximum(q.T, 1e-38))  # the gate's logits up to a per-token shift, which top-k ignores
        if span > 0:
            ends = bias + span * np.concatenate([np.eye(len(e)), -np.eye(len(e)), np.zeros((1, len(e)))])
            activated = _decode_activation(z, ends, layers, top_k, tau)
            totals = activated[:-1] @ c + task_weight * drift_np(q, ends[:-1])
            values = [float(v) for v in (activated[-1] @ feats) @ weights]
            return values, drift, (totals[:len(e)] - totals[len(e):]) / (2 * span)
        inclusion, slope, edge = topk_inclusion_np(z + bias, top_k, tau)
        activated, d_act = activation_np(inclusion.reshape(layers, -1, len(e)))
        share = activated.mean(0)
        p_bar = e * (q @ (1.0 / s)) / q.shape[1]
        h = d_act.reshape(inclusion.shape) * (c / layers) * slope
        half = h.sum(1) / 2  # theta's share: it moves by half of either edge expert's logit
        grad = h.sum(0) - sum(np.bincount(edge[:, j], half, len(e)) for j in range(edge.shape[1]))
    values = [float(v) for v in (share @ feats) @ weights]
    return values, drift, grad + task_weight * (p_bar - q_bar)


def _decode_activation(z: np.ndarray, biases: np.ndarray, layers: int, top_k: int, tau: float) -> np.ndarray:
    """P(e activated) averaged over the layers [J, E] of logits z [N, E] (layer-major) under each bias [J, E]:
    the values of topk_inclusion_np and activation_np, without their slopes or the sort's indices."""
    if top_k >= z.shape[1]:
        return np.ones((len(biases), z.shape[1]))
    routed = (z[None] + biases[:, None, :]).reshape(len(biases), layers, -1, z.shape[1])
    edges = -np.partition(-routed, (top_k - 1, top_k), axis=-1)
    theta = (edges[..., top_k - 1:top_k] + edges[..., top_k:top_k + 1]) / 2
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf: an expert some token surely takes is activated
        idle = np.log1p(-0.5 * (1.0 + np.tanh((routed - theta) / (2.0 * tau)))).sum(-2)
    return -np.expm1(idle).mean(1)
