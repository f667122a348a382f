"""The expected-activation cost of a decode step and the quality guard (ttha.objective)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ttha.objective import activation_np, drift_np, expected_activation, expected_cost, guard_scale


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
