"""Grouped MoE decode (moe.py, _moe_kernels.py) against its torch reference (Triton's interpreter on CPU with small
shapes; real sizes and CUDA graphs on the GPU). The route plan it reads: test_topk_router.py."""
import pytest
import torch

from ttha.kernels import (GroupedExperts, RoutePlan, _backend, moe_decode, moe_decode_ref, moe_decode_triton,
                          route_plan_ref, set_backend, topk_router, topk_router_ref)
from ttha.kernels import _moe_kernels as mk
from ttha.kernels.quant import dequantize, quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not _backend.HAS_TRITON or (DEV == "cpu" and not _backend.interpreting()),
    reason="needs triton on CUDA or TRITON_INTERPRET=1")
MIXED = (16, 4, 2, 16, 4, 2)


def layer(bits, d=64, f=128, group=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n, k: torch.randn(n, k, generator=g) / k**0.5  # noqa: E731
    return GroupedExperts.from_weights([(rand(f, d), rand(d, f), b) for b in bits], group, dtype).to(DEV)


def route(t, e, k, seed=0, allowed=None, dtype=torch.bfloat16, d=64):
    """x [t, d], and the top-k weights and plan of random logits, only over the `allowed` experts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g).to(DEV)
    bias = torch.zeros(e, device=DEV)
    if allowed is not None:
        bias[[i for i in range(e) if i not in allowed]] = -1e4
    w, _, plan = topk_router_ref(logits, bias, k, return_plan=True)
    return torch.randn(t, d, generator=g).to(DEV, dtype), w, plan


def rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}  # output and h rounding (the interpreter truncates to bf16)


@needs_kernel
@pytest.mark.parametrize("bits", [(16,) * 3, (4,) * 3, (2,) * 3, MIXED])
@pytest.mark.parametrize("t,k", [(1, 1), (1, 2), (5, 2), (8, 2)])
def test_kernel_matches_reference(bits, t, k):
    experts = layer(bits, seed=t)
    x, w, plan = route(t, len(bits), k, seed=t + k)
    out = moe_decode_triton(x, w, plan, experts)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]


@needs_kernel
@pytest.mark.parametrize("group,d,f", [(32, 64, 96), (128, 128, 256)])
def test_group_sizes_and_n_not_a_multiple_of_the_tile(group, d, f):
    """Groups of 32 (4-bit only: 2-bit needs 4-word groups) and 128 (the up projection's N block = one group);
    d_ff = 96 leaves the last 64-row block of the up projection half empty."""
    bits = (16, 4, 16, 4) if group == 32 else MIXED
    experts = layer(bits, d, f, group)
    x, w, plan = route(6, len(bits), 2, d=d)
    assert rel(moe_decode_triton(x, w, plan, experts), moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]


@needs_kernel
@pytest.mark.parametrize("up,down", [(1, {"BN": 64, "BK": 32, "SPLIT_K": 2}), (1, {"BN": 64, "BK": 64, "SPLIT_K": 1}),
                                     (1, {"BN": 32, "BK": 16, "SPLIT_K": 4}), (2, {"BN": 64, "BK": 32, "SPLIT_K": 2}),
                                     (4, {"BN": 64, "BK": 32, "SPLIT_K": 1})])
def test_fp16_and_splits(up, down):
    """fp16 (rounded exactly by the interpreter): only accumulation order and the 4/2-bit magic cancellation
    differ; the down projection's K splits are summed by the combine, the up projection's by the finish kernel
    (d_model 256: four splits of one 64-group each)."""
    experts = layer(MIXED, 256, 256, dtype=torch.float16)
    x, w, plan = route(7, 6, 2, dtype=torch.float16, d=256)
    out = moe_decode_triton(x, w, plan, experts, up_config={"BN": 64, "BK": 32, "SPLIT_K": up}, down_config=down)
    assert rel(out, moe_decode_ref(x, w, plan, experts)) < TOL[torch.float16]


@needs_kernel
def test_rows_of_a_wider_tensor_and_no_tokens():
    """x a column slice (row stride 2 d) reads the same as its copy; T = 0 launches nothing."""
    experts = layer(MIXED, seed=2)
    x, w, plan = route(5, 6, 2, seed=2)
    wide = torch.cat([x, torch.randn_like(x)], 1)[:, :64]
    assert rel(moe_decode_triton(wide, w, plan, experts), moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]
    x0, w0, plan0 = route(0, 6, 2)
    assert moe_decode_triton(x0, w0, plan0, experts).shape == (0, 64)


def poisoned(experts: GroupedExperts, unused) -> GroupedExperts:
    """A copy whose `unused` experts' weights are NaN (16-bit) or have NaN scales and mins (4/2-bit)."""
    out = experts.clone()
    for e in unused:
        for side in ("up", "down"):
            wt = out.weight(e, side)
            for t in ((wt,) if isinstance(wt, torch.Tensor) else (wt.scales, wt.mins)):
                t.fill_(float("nan"))
    return out


@needs_kernel
def test_unrouted_experts_are_never_read():
    """Experts 0 (16-bit), 2 (2-bit) and 4 (4-bit) get no token: with their weights NaN the output is finite and
    equals the reference on the clean layer."""
    experts = layer(MIXED, seed=3)
    x, w, plan = route(8, 6, 2, seed=4, allowed={1, 3, 5})
    assert plan.counts[[0, 2, 4]].tolist() == [0, 0, 0]
    out = moe_decode_triton(x, w, plan, poisoned(experts, [0, 2, 4]))
    assert out.isfinite().all()
    assert rel(out, moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]


@needs_kernel
@pytest.mark.parametrize("expert", [0, 1, 2])
def test_all_tokens_on_one_expert_in_chunks(expert):
    """40 tokens top-1 on one expert of each precision: its slots span two chunks of BM = 32 rows (each program
    reads the weight tile for its chunk); every other expert is empty."""
    experts = layer(MIXED, seed=expert)
    x, w, plan = route(40, 6, 1, seed=expert, allowed={expert})
    assert plan.counts[expert] == 40
    out = moe_decode_triton(x, w, plan, poisoned(experts, [e for e in range(6) if e != expert]))
    assert out.isfinite().all() and rel(out, moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]


@needs_kernel
@pytest.mark.parametrize("expert", [0, 1, 2])
def test_up_splits_of_one_expert_leave_the_others_unread(expert):
    """All tokens on one expert, the up projection in 4 K splits: the finish kernel's programs of the other
    (NaN) experts return before reading, and the summed h matches the reference at each precision."""
    experts = layer(MIXED, 256, 128, seed=expert)
    x, w, plan = route(9, 6, 1, seed=expert, allowed={expert}, d=256)
    out = moe_decode_triton(x, w, plan, poisoned(experts, [e for e in range(6) if e != expert]),
                            up_config={"BN": 64, "BK": 64, "SPLIT_K": 4})
    assert out.isfinite().all() and rel(out, moe_decode_ref(x, w, plan, experts)) < TOL[x.dtype]


@needs_kernel
def test_dispatch():
    """moe_decode: the reference on CPU unless the backend is forced to triton (the interpreter); a layer the
    kernels do not take (2-bit in groups of 32) stays on the reference even then."""
    experts = layer((16, 4, 2), seed=1)
    x, w, plan = route(4, 3, 2)
    ref = moe_decode_ref(x, w, plan, experts)
    narrow = layer((2, 2), group=32)
    x2, w2, plan2 = route(3, 2, 1)
    try:
        set_backend("triton")
        assert rel(moe_decode(x, w, plan, experts), ref) < TOL[x.dtype]
        assert torch.equal(moe_decode(x2, w2, plan2, narrow), moe_decode_ref(x2, w2, plan2, narrow))
    finally:
        set_backend("auto")
    if DEV == "cpu":
        assert torch.equal(moe_decode(x, w, plan, experts), ref)


def test_reference_is_the_experts_ffn():
    """moe_decode_ref = sum_j w[t, j] * (w2 @ gelu(w1 @ x[t])) of each token's experts, h rounded to x's dtype."""
    experts = layer((16, 4, 2), seed=5)
    idx = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]], device=DEV)
    w = torch.rand(5, 2, device=DEV)
    x = torch.randn(5, 64, device=DEV, dtype=torch.bfloat16)
    want = torch.zeros(5, 64, device=DEV)
    for t in range(5):
        for j in range(2):
            w1, w2 = (experts.weight(int(idx[t, j]), s) for s in ("up", "down"))
            w1, w2 = (v.float() if isinstance(v, torch.Tensor) else dequantize(v) for v in (w1, w2))
            h = torch.nn.functional.gelu(x[t].float() @ w1.T).to(x.dtype).float()
            want[t] += w[t, j] * (h @ w2.T)
    torch.testing.assert_close(moe_decode_ref(x, w, route_plan_ref(idx, 3), experts), want.to(x.dtype),
                               rtol=1e-2, atol=1e-3)


def test_grouped_experts_stack_and_map():
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(128, 64, generator=g), torch.randn(64, 128, generator=g), b) for b in (4, 16, 2, 16)]
    experts = GroupedExperts.from_weights(ws, 64)
    assert experts.bits == (4, 16, 2, 16) and experts.index == (0, 0, 0, 1)
    assert experts.table.tolist() == [[1, 0, 2, 0], [0, 0, 0, 1]]
    assert experts.dense[0].shape == (2, 128, 64) and experts.quant[4][1].packed.shape[0] == 1
    assert torch.equal(experts.weight(3, "down"), ws[3][1].bfloat16())
    q = experts.weight(2, "up")
    assert torch.equal(dequantize(q), dequantize(quantize(ws[2][0], 2, 64)))
    assert experts.expert_bytes(1) == 2 * 128 * 64 * 2
    assert experts.expert_bytes(0) == sum(quantize(w, 4, 64).nbytes for w in ws[0][:2])


@pytest.mark.parametrize("make,name", [
    (lambda: GroupedExperts.from_weights([(torch.randn(8, 4), torch.randn(4, 8), 8)]), "bits=8"),
    (lambda: GroupedExperts.from_weights([(torch.randn(8, 64), torch.randn(64, 8), 16),
                                          (torch.randn(16, 64), torch.randn(64, 16), 16)]), r"experts\[1\]"),
    (lambda: GroupedExperts.from_parts([]), "experts"),
])
def test_bad_layers_raise_value_error(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("change,name", [
    (lambda x, w, p: (x[:, :32], w, p), "x"),
    (lambda x, w, p: (x.float(), w, p), "x: dtype"),
    (lambda x, w, p: (x, w[:2], p), "weights"),
    (lambda x, w, p: (x, w, RoutePlan(p.counts.long(), p.offsets, p.order)), "plan.counts"),
    (lambda x, w, p: (x, w, RoutePlan(p.counts, p.offsets, p.order[:3])), "plan.order"),
    (lambda x, w, p: (x, w, (p.counts, p.offsets, p.order)), "plan"),
])
def test_bad_arguments_raise_value_error_naming_them(change, name):
    experts = layer((16, 4))
    x, w, plan = route(3, 2, 2)
    with pytest.raises(ValueError, match=name):
        moe_decode(*change(x, w, plan), experts)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("up,n,k", [(True, 14336, 4096), (False, 4096, 14336)])
def test_autotune_space_fits_the_kernel_at_real_sizes(group, up, n, k):
    """Every tuned config at the bench's layer (d_model 4096, d_ff 14336) is taken by the kernel: the space is not
    pruned to the fallback."""
    args = dict(N=n, K=k, GROUP=group, HAS16=True, HAS4=True, HAS2=True, UP=up)
    space = mk.UP_CONFIGS if up else mk.DOWN_CONFIGS
    assert mk._prune(space, args) == [c for c in space if mk.fits(c, args)] and len(mk._prune(space, args)) >= 3


def test_bench_patterns_route_as_named_and_per_expert_step_is_the_reference(monkeypatch):
    """The MoE bench's pieces at a small d_model / d_ff on CPU (the bench itself needs the GPU): each pattern's
    logits give that routing, the per-expert step it compares against computes the reference, and its table
    prints."""
    from ttha.kernels import bench_moe as bm

    monkeypatch.setattr(bm, "D", 64)
    monkeypatch.setattr(bm, "FF", 128)
    lay = bm.build_layer("cpu")
    x, bias = torch.randn(bm.T, 64).bfloat16(), torch.zeros(bm.E)
    for name, pattern in bm.PATTERNS.items():
        k = len(pattern[0])
        logits = bm.pattern_logits(pattern, "cpu")
        w, idx, plan = topk_router(logits, bias, k, return_plan=True)
        assert idx.tolist() == [list(p) for p in pattern], name
        got = bm.per_expert_step(x, logits, bias, k, pattern, lay)(lay)
        assert rel(got, moe_decode_ref(x, w, plan, lay)) < 2e-2, name
    assert {bm.BITS[e] for experts in bm.PATTERNS["int4+int2"] for e in experts} == {4, 2}
    row = dict(table="moe", pattern="all 8", E=8, k=2, bytes=9.7e8, graph_us=250.0, bw_share=0.8, torch_graph_us=400.0,
               torch_bw_share=0.5, graph_ratio=1.6, relerr=3e-3, kernels={"_moe_kernel": 240.0})
    assert "_moe_kernel 240.0" in bm.fmt_moe([row])[-1]


# --- GPU: real sizes, bf16, CUDA graphs --------------------------------------------------------------------------

def gpu_layer(bits, d, f, group=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda n, k: torch.randn(n, k, device="cuda", generator=g) / k**0.5  # noqa: E731
    return GroupedExperts.from_weights([(rand(f, d), rand(d, f), b) for b in bits], group)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("t,k", [(1, 2), (16, 2), (48, 2)])
def test_gpu_kernel_matches_reference(group, t, k):
    """Mixed i % 3 over 8 experts, d_model 1024, d_ff 2816, bf16; T = 48 runs two chunks of 32 slots."""
    experts = gpu_layer([(16, 4, 2)[i % 3] for i in range(8)], 1024, 2816, group)
    logits, bias = torch.randn(t, 8, device="cuda"), torch.zeros(8, device="cuda")
    w, _, plan = topk_router(logits, bias, k, return_plan=True)
    x = torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16)
    out = moe_decode(x, w, plan, experts)
    assert out.isfinite().all() and rel(out, moe_decode_ref(x, w, plan, experts)) < 1e-2


@pytest.mark.gpu
def test_gpu_cuda_graph_follows_routing_and_bias_written_in_place():
    """Router (with the plan) + moe_decode captured once; new logits and a new bias written in place into the
    captured tensors change the routing at replay, no recapture; experts the bias keeps out carry NaN weights
    and the output stays finite (their weights are never read)."""
    from ttha.kernels.tuning import capture

    t, k, d, f = 16, 2, 1024, 2048
    experts = gpu_layer([(16, 4, 2)[i % 3] for i in range(8)], d, f, seed=1)
    off = [0, 4, 5]  # a 16-bit, a 4-bit and a 2-bit expert that the second bias excludes
    layer_nan = poisoned(experts, off)
    logits = torch.randn(t, 8, device="cuda")
    bias = torch.zeros(8, device="cuda")
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    held = {}

    def step(_):
        w, idx, plan = topk_router(logits, bias, k, return_plan=True)
        held.update(w=w, idx=idx, plan=plan, out=moe_decode(x, w, plan, layer_nan))

    bias[off] = -100.0  # capture (and tune) with the poisoned experts already excluded
    graph = capture(step, [None])
    for seed in range(3):
        logits.copy_(torch.randn(t, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        new_bias = torch.randn(8, device="cuda") * 2
        new_bias[off] = -100.0
        bias.copy_(new_bias)
        graph.replay()
        torch.cuda.synchronize()
        w_ref, idx_ref, plan_ref = topk_router_ref(logits, bias, k, return_plan=True)
        assert torch.equal(held["idx"], idx_ref) and torch.equal(held["plan"].order, plan_ref.order)
        assert not torch.isin(held["idx"], torch.tensor(off, device="cuda")).any()
        out = held["out"]
        assert out.isfinite().all()
        assert rel(out, moe_decode_ref(x, w_ref, plan_ref, experts)) < 1e-2
