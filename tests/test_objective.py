"""The expected-activation cost of a decode step and the quality guard (ttha.objective)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ttha.objective import (activation_np, drift_np, expected_activation, expected_cost, gate_activation_np,
                            guard_scale, loss_autograd, loss_closed_form, topk_inclusion, topk_inclusion_np)


def direct(p: torch.Tensor, draws: int) -> torch.Tensor:
    """P(e activated) = 1 - prod_t (1 - p_te)^k, as written (autograd's reference)."""
    return 1.0 - torch.prod((1.0 - p) ** draws, dim=-2)


def routing_probs(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)


@pytest.mark.parametrize("draws", [1, 2])
def test_value_and_gradient_match_autograd_on_the_direct_formula(draws):
    p = routing_probs(3, 16, 8).requires_grad_()  # 3 layers x 16 tokens x 8 experts
    cost = torch.linspace(0.2, 1.0, 8, dtype=torch.float64)
    got = expected_cost(p, cost, draws).sum()
    (g_got,) = torch.autograd.grad(got, p)
    ref = (direct(p, draws) @ cost).sum()
    (g_ref,) = torch.autograd.grad(ref, p)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-14)
    a_np, d_np = activation_np(p.detach().numpy(), draws)  # the numpy form update_ttha uses
    assert np.allclose(a_np, direct(p, draws).detach().numpy(), rtol=1e-12)
    (g_act,) = torch.autograd.grad(direct(p, draws).sum(), p)
    assert np.allclose(d_np, g_act.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("draws", [1, 2])
def test_gradient_matches_finite_differences(draws):
    p = (0.05 + 0.9 * torch.rand(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert torch.autograd.gradcheck(lambda x: expected_activation(x, draws), (p.requires_grad_(),))


def test_edge_cases_zero_one_and_a_single_token():
    p = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    for draws in (1, 2):
        a = expected_activation(p, draws)
        assert a.tolist() == pytest.approx([0.0, 1 - (0.7 * 0.5) ** draws, 1.0])
        (g,) = torch.autograd.grad(a.sum(), p)
        assert torch.isfinite(g).all()
        assert g[:, 0].tolist() == pytest.approx([draws, draws])  # an unused expert: each token's full weight
        assert g[1, 2] == 0.0  # expert 2 is certain through token 0: token 1 cannot change it
        assert g[0, 2] == pytest.approx(0.8 if draws == 1 else 0.0)  # d/dp of 1-(1-p)^k at p = 1 (k = 1: 1-p_1)
    one = torch.tensor([[0.25, 0.75]], dtype=torch.float64, requires_grad=True)  # one token
    a = expected_activation(one, 2)
    assert a.tolist() == pytest.approx([1 - 0.75 ** 2, 1 - 0.25 ** 2])
    (g,) = torch.autograd.grad(a.sum(), one)
    assert g[0].tolist() == pytest.approx([2 * 0.75, 2 * 0.25])


def test_tiny_probabilities_keep_their_precision():
    """1 - prod(1 - p) cancels to rounding noise for tiny p; the log1p/expm1 form keeps every digit."""
    p = torch.full((4, 1), 1e-12, dtype=torch.float64)
    assert float(expected_activation(p)) == pytest.approx(4e-12, rel=1e-9, abs=0)
    assert float(direct(p, 1)) != pytest.approx(4e-12, rel=1e-9, abs=0)  # what the naive form gives
    with pytest.raises(ValueError, match="tokens, experts"):
        expected_activation(torch.rand(4))


def test_guard_scale_is_the_largest_within_the_drift_budget():
    q = routing_probs(64, 6, seed=3).numpy().T  # [E, N]
    bias = np.array([2.0, -1.0, 0.5, -2.0, 1.0, 0.0])
    budget = 0.01
    assert drift_np(q, bias) > budget
    alpha = guard_scale(q, bias, budget)
    assert 0.0 < alpha < 1.0
    assert drift_np(q, alpha * bias) == pytest.approx(budget, rel=1e-4)  # on the bound, not inside it
    assert drift_np(q, alpha * bias) <= budget
    assert guard_scale(q, 0.01 * bias, budget) == 1.0  # within the budget: applied as it is
    assert guard_scale(q, bias, None) == 1.0  # no guard
    assert guard_scale(None, bias, budget) == 0.0  # no gate record yet: route as the gate
    assert guard_scale(None, np.zeros(6), budget) == 1.0
    # drift_np is the mean KL(q || softmax(log q + b))
    p = np.exp(np.log(q) + bias[:, None])
    p /= p.sum(0)
    assert drift_np(q, bias) == pytest.approx(float((q * np.log(q / p)).sum(0).mean()), rel=1e-9)


def concentrated_gate(steps: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Gate probabilities [steps, tokens, 8] of a gate that sends a step's tokens to its three favourite experts
    (as a trained gate does: the streams of a step see similar text) and leaves each other expert a few percent."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.5, (steps, tokens, 8))
    favourites = np.stack([rng.permutation(8)[:3] for _ in range(steps)])
    for j in range(3):
        np.put_along_axis(logits, np.broadcast_to(favourites[:, None, j:j + 1], (steps, tokens, 1)),
                          2.0 + rng.normal(0.0, 0.5, (steps, tokens, 1)), -1)
    q = np.exp(logits)
    return q / q.sum(-1, keepdims=True)


def test_topk_inclusion_counts_the_experts_top_k_activates():
    """On a concentrated gate the smoothed top-k inclusion estimates how often top-2 activates each expert within
    a few points, where reading the probabilities as 2 draws calls almost every expert activated."""
    q = concentrated_gate(400, 16)
    top2 = np.argsort(-q, -1)[..., :2]
    hit = np.zeros_like(q)
    np.put_along_axis(hit, top2, 1.0, -1)
    true = (1.0 - np.prod(1.0 - hit, axis=1)).mean(0)  # per expert, over steps
    rows = q.reshape(-1, 8).T  # [E, N], steps as layers
    est = gate_activation_np(rows, 400, 2, 0.1)
    draws = activation_np(q, 2)[0].mean(0)
    assert 0.3 < true.mean() < 0.6
    assert np.abs(est - true).max() < 0.05
    assert draws.mean() > true.mean() + 0.3  # the draw model this replaced


@pytest.mark.parametrize("k", [1, 2, 7])
def test_topk_inclusion_numpy_matches_torch_and_its_gradient(k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    ref = topk_inclusion(z, k, 0.5)
    got, slope, edge = topk_inclusion_np(z.numpy(), k, 0.5)
    assert np.allclose(got, ref.numpy(), rtol=1e-12)
    assert ((ref > 0.5).sum(-1) == k).all()  # above one half: exactly the top-k
    w = torch.rand(6, 8, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad((topk_inclusion(z.requires_grad_(), k, 0.5) * w).sum(), z)
    h = (w.numpy() * slope)  # the closed form: through s with theta held, then theta's half from its two experts
    manual = h.copy()
    for j in range(edge.shape[1]):
        np.add.at(manual, (np.arange(6), edge[:, j]), -h.sum(1) / 2)
    assert np.allclose(manual, auto.numpy(), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: topk_inclusion(x, k, 0.5), (z.detach().requires_grad_(),))
    assert (topk_inclusion(z, 8, 0.5) == 1).all() and (topk_inclusion_np(z.detach().numpy(), 8, 0.5)[0] == 1).all()


def test_decode_loss_pushes_the_costly_experts_off_a_concentrated_gate():
    """Over target, the decode loss's bias gradient (closed form = autograd) pushes hardest on the costly
    precision: summed over the experts of a precision (the adapter's bias is a function of an expert's costs),
    the 16-bit experts' gradient is the largest on a gate that favours no precision."""
    q = concentrated_gate(200, 16, seed=1).reshape(-1, 8)
    feats = np.tile(np.array([[1.0, 1.0, -1.0], [0.9, 0.5, -0.9], [0.9, 0.4, -0.9]], np.float32), (3, 1))[:8]
    weights = np.array([[0, 0, 0, 0], [10.0, 0, 0, 0], [0, 0, 0, 0.1]], np.float32)
    values, drift, grad = loss_closed_form(q.T.copy(), np.zeros(8), feats, weights, 1.0, 200, 2, 0.1)
    bias = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    hw, d = loss_autograd(torch.from_numpy(np.log(q)), bias, torch.from_numpy(feats).double(),
                          weights.astype(np.float64), 1.0, 200, 2, 0.1)
    (hw.sum() - 2 * hw[3] + d).backward()
    assert np.allclose(grad, bias.grad.numpy(), rtol=1e-5, atol=1e-7)  # c is float32
    assert values == pytest.approx(hw.detach().tolist(), rel=1e-6)
    per_precision = [grad[[0, 3, 6]].sum(), grad[[1, 4, 7]].sum(), grad[[2, 5]].sum()]
    assert per_precision[0] > 0 > max(per_precision[1:])


def test_the_secant_sees_the_saving_of_idling_an_expert_the_local_slope_does_not():
    """A gate that reads its 16-bit experts in every step: the local slope (span 0) moves tokens onto them (each
    is read anyway) and the secant over +-4 logits moves them off, the costly experts first."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.0, (200, 16, 8))
    logits[..., [0, 3, 6]] += 1.0
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    feats = np.tile(np.array([[1.0, 1.0, -1.0], [0.9, 0.5, -0.9], [0.9, 0.4, -0.9]], np.float32), (3, 1))[:8]
    weights = np.array([[0, 0, 0, 0], [10.0, 0, 0, 0], [0, 0, 0, 0.1]], np.float32)
    pulls = {}
    for span in (0.0, 4.0):
        grad = loss_closed_form(q.reshape(-1, 8).T.copy(), np.zeros(8), feats, weights, 1.0, 200, 2, 0.1, span)[2]
        pulls[span] = -(grad - grad.mean())  # the direction Adam moves the (centred) bias
    assert pulls[0.0][[0, 3, 6]].min() > 0  # onto the 16-bit experts
    assert pulls[4.0][[0, 3, 6]].max() < pulls[4.0][[1, 2, 4, 5, 7]].min()  # off them, hardest


def test_the_secant_is_the_central_difference_of_the_autograd_total():
    q = concentrated_gate(6, 16, seed=2).reshape(-1, 8)
    feats = np.tile(np.array([[1.0, 1.0, -1.0], [0.9, 0.5, -0.9], [0.9, 0.4, -0.9]], np.float32), (3, 1))[:8]
    weights = np.array([[0, 0, 0, 0], [10.0, 0, 0, 0], [0, 0, 0, 0.1]], np.float32)
    bias = np.linspace(-1.0, 1.0, 8)
    values, drift, grad = loss_closed_form(q.T.copy(), bias, feats, weights, 1.0, 6, 2, 0.1, 2.0)

    def total(b):
        hw, d = loss_autograd(torch.from_numpy(np.log(q)), torch.from_numpy(b), torch.from_numpy(feats).double(),
                              weights.astype(np.float64), 1.0, 6, 2, 0.1)
        return float(hw[:3].sum() - hw[3] + d)
    central = [(total(bias + 2.0 * u) - total(bias - 2.0 * u)) / 4.0 for u in np.eye(8)]
    assert np.allclose(grad, central, rtol=1e-5, atol=1e-6)
    hw, d = loss_autograd(torch.from_numpy(np.log(q)), torch.from_numpy(bias), torch.from_numpy(feats).double(),
                          weights.astype(np.float64), 1.0, 6, 2, 0.1)
    assert values == pytest.approx(hw.tolist(), rel=1e-6) and drift == pytest.approx(float(d), rel=1e-6)
