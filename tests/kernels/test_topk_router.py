"""Fused router top-k kernel vs softmax + topk + normalise, and the route plan it writes (Triton interpreter on
CPU, real sizes on GPU)."""
import pytest
import torch

from ttha.kernels import RoutePlan, _backend, route_plan_ref, topk_router, topk_router_ref, topk_router_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not _backend.HAS_TRITON or (DEV == "cpu" and not _backend.interpreting()),
    reason="needs triton on CUDA or TRITON_INTERPRET=1")


def _inputs(t, e, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, e, generator=g) * 2).to(DEV, dtype), torch.randn(e, generator=g).to(DEV)


def _check(w, idx, logits, bias, k):
    wr, ir = topk_router_ref(logits, bias, k)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == idx.shape == (logits.shape[0], k)
    # Chosen experts must carry the reference's logits; at real sizes two distinct logits can round to
    # one fp32 probability, so the torch sequence may pick either index of such a near-tie.
    z = logits.float() + bias.float()
    torch.testing.assert_close(z.gather(1, idx), z.gather(1, ir), rtol=0, atol=1e-5)
    assert float((idx == ir).float().mean()) > 0.999
    torch.testing.assert_close(w, wr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(logits.shape[0], device=w.device))


@needs_kernel
@pytest.mark.parametrize("t,e,k", [(1, 8, 1), (37, 8, 2), (33, 8, 8), (50, 64, 2), (19, 128, 8), (5, 256, 8),
                                   (21, 10, 10), (9, 3, 1)])
def test_matches_reference(t, e, k):
    logits, bias = _inputs(t, e, seed=t * e + k)
    w, idx, counts = topk_router_triton(logits, bias, k, return_counts=True)
    _check(w, idx, logits, bias, k)
    assert torch.equal(counts.cpu(), torch.bincount(idx.flatten().cpu(), minlength=e).int())
    assert int(counts.sum()) == t * k


@needs_kernel
def test_bf16_logits_and_bias_change_choice():
    logits, bias = _inputs(16, 8, seed=1, dtype=torch.bfloat16)
    w, idx = topk_router_triton(logits, bias, 2)
    _check(w, idx, logits, bias, 2)
    big = torch.zeros(8, device=DEV)
    big[5] = 100.0  # a large bias forces expert 5 into every token's top-1
    _, idx = topk_router_triton(logits, big, 1)
    assert (idx == 5).all()


@needs_kernel
def test_dispatch_uses_kernel_when_forced_and_reference_for_large_e():
    logits, bias = _inputs(12, 300, seed=2)
    try:
        _backend.set_backend("triton")
        w, idx = topk_router(logits, bias, 3)  # E > 256: falls back to the reference
        _check(w, idx, logits, bias, 3)
        logits, bias = _inputs(12, 16, seed=3)
        w, idx = topk_router(logits, bias, 4)
        _check(w, idx, logits, bias, 4)
    finally:
        _backend.set_backend("auto")


def test_route_plan_ref_groups_slots_by_expert():
    plan = route_plan_ref(torch.tensor([[2, 0], [0, 1], [2, 3]]), 5)
    assert plan.counts.tolist() == [2, 1, 2, 1, 0] and plan.offsets.tolist() == [0, 2, 3, 5, 6, 6]
    assert plan.order.tolist() == [1, 2, 3, 0, 4, 5]  # slot t * k + j, ascending within an expert
    assert all(v.dtype == torch.int32 for v in (plan.counts, plan.offsets, plan.order))


@needs_kernel
@pytest.mark.parametrize("t,e,k", [(1, 8, 1), (16, 8, 2), (7, 5, 3), (64, 128, 2), (33, 64, 2), (5, 3, 3), (0, 8, 2),
                                   (200, 8, 2)])
def test_router_kernel_writes_the_plan(t, e, k):
    """The plan from the router's launch (one program at decode sizes; past plan_supported, (200, 8, 2), from
    route_plan_ref on the kernel's indices) is exactly the reference plan of its indices."""
    g = torch.Generator().manual_seed(t * e + k)
    logits, bias = torch.randn(t, e, generator=g).to(DEV), torch.randn(e, generator=g).to(DEV)
    w, idx, counts, plan = topk_router_triton(logits, bias, k, return_counts=True, return_plan=True)
    ref = route_plan_ref(idx, e)
    for name in ("counts", "offsets", "order"):
        assert torch.equal(getattr(plan, name), getattr(ref, name)), name
    assert torch.equal(counts, plan.counts)
    if t:
        torch.testing.assert_close(w, topk_router_ref(logits, bias, k)[0], rtol=1e-5, atol=1e-6)


def test_router_plan_on_the_torch_path():
    logits, bias = torch.randn(9, 6), torch.randn(6)
    w, idx, plan = topk_router(logits, bias, 2, return_plan=True)
    assert isinstance(plan, RoutePlan) and torch.equal(plan.order, route_plan_ref(idx, 6).order)
    assert len(topk_router(logits, bias, 2)) == 2  # the old API stays


@pytest.mark.parametrize("args,name", [
    ((torch.randn(4, 8, 2), torch.zeros(8), 2), "logits"),
    ((torch.randint(0, 3, (4, 8)), torch.zeros(8), 2), "logits: dtype"),
    ((torch.randn(4, 8), torch.zeros(7), 2), "bias"),
    ((torch.randn(4, 8), torch.zeros(8), 0), "k=0"),
    ((torch.randn(4, 8), torch.zeros(8), 9), "k=9"),
])
def test_bad_arguments_raise_value_error_naming_them(args, name):
    with pytest.raises(ValueError, match=name):
        topk_router(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k", [(65536, 128, 8), (16384, 64, 2), (4096, 8, 1)])
def test_gpu_real_sizes(t, e, k):
    logits, bias = _inputs(t, e, seed=k)
    w, idx, counts = topk_router(logits, bias, k, return_counts=True)
    _check(w, idx, logits, bias, k)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=e).int())


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k", [(16, 8, 2), (64, 128, 2), (32, 256, 1), (4096, 64, 2)])
def test_gpu_router_plan(t, e, k):
    """The plan on the GPU: written by the router's launch at decode sizes, by route_plan_ref at T = 4096."""
    logits, bias = torch.randn(t, e, device="cuda"), torch.randn(e, device="cuda")
    _, idx, plan = topk_router(logits, bias, k, return_plan=True)
    ref = route_plan_ref(idx, e)
    assert all(torch.equal(getattr(plan, n), getattr(ref, n)) for n in ("counts", "offsets", "order"))
