"""TTHAAdapter and HostAdam: neutral start, numpy forward/backward and Adam against torch."""
import numpy as np
import torch

from ttha.adapter import HostAdam, TTHAAdapter

E = 6  # experts


def test_adapter_starts_neutral():
    a = TTHAAdapter(3, 7, hidden=16)
    assert torch.equal(a(torch.rand(E, 3), torch.rand(7)), torch.zeros(E))


def test_host_adam_steps_like_torch_adam():
    torch.manual_seed(0)
    ours, ref = TTHAAdapter(), TTHAAdapter()
    ref.load_state_dict(ours.state_dict())
    host, torch_adam = HostAdam(ours.parameters(), lr=0.05), torch.optim.Adam(ref.parameters(), lr=0.05)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ours.parameters()]
        host.step([g.numpy() for g in grads])
        for p, g in zip(ref.parameters(), grads):
            p.grad = g
        torch_adam.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), step
    assert not torch.equal(ours.net[0].weight, TTHAAdapter().net[0].weight)  # it moved


def test_adapter_numpy_forward_and_grads_match_autograd():
    torch.manual_seed(1)
    adapter = TTHAAdapter()
    with torch.no_grad():
        adapter.net[-1].weight.normal_()
    cost, hw = torch.rand(6, 3), torch.rand(7)
    out = adapter(cost, hw)
    g = torch.randn(6)
    out.backward(g)
    bias, saved = adapter.forward_np(cost.numpy(), hw.numpy())
    assert np.allclose(bias, out.detach().numpy(), rtol=1e-5, atol=1e-6)
    for ours, p in zip(adapter.grads_np(saved, g.numpy()), adapter.parameters()):
        assert ours.shape == tuple(p.shape) and np.allclose(ours, p.grad.numpy(), rtol=1e-4, atol=1e-6)
