"""Fused dequant-linear kernel vs its torch reference (Triton interpreter on CPU, real sizes on GPU)."""
import importlib
import json

import numpy as np
import pytest
import torch

from ttha.kernels import _backend, dequant_linear, dequant_linear_ref, dequant_linear_triton
from ttha.kernels.quant import dequantize, quantize, row_words

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not _backend.HAS_TRITON or (DEV == "cpu" and not _backend.interpreting()),
    reason="needs triton on CUDA or TRITON_INTERPRET=1")


def _rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _case(m, n, k, bits, group, dtype=torch.bfloat16, bias=True, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw = quantize(w, bits, group).to(DEV)
    shape = (*lead, k) if lead else (m, k)
    x = torch.randn(*shape, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    # fp32 reference on the same dequantized weight: only the kernel's output rounding differs
    ref = x.float() @ dequantize(qw).T + (b.float() if bias else 0)
    return x, qw, b, ref


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,bias", [(1, True), (3, False), (17, True)])
def test_matches_reference(bits, group, m, bias):
    # N = 40: not a multiple of the 16-wide tile; K = 3 groups: not a multiple of the 128-wide K tile
    x, qw, b, ref = _case(m, 40, 3 * group, bits, group, bias=bias, seed=bits + group + m)
    y = torch.full((m, 40), float("nan"), dtype=x.dtype, device=DEV)  # poisoned: every element must be written
    y = dequant_linear_triton(x, qw, b)
    assert y.shape == (m, 40) and y.dtype == x.dtype and not y.isnan().any()
    assert _rel(y, ref) < 1e-2  # bf16 output rounding (~4e-3)
    assert _rel(y, dequant_linear_ref(x, qw, b)) < 1e-2


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,bias,split", [(1, True, 1), (1, False, 3), (3, True, 2)])
def test_gemv_kernel_matches_reference(bits, group, m, bias, split):
    """The decode GEMV kernel (x by half2 pairs, per word code-times-x sums, scales per group): N = 40 is not
    a multiple of BN = 16; K = 6 groups in 1..3 splits; tiles of one group or two."""
    x, qw, b, ref = _case(m, 40, 6 * group, bits, group, dtype=torch.float16, bias=bias, seed=bits * group + m)
    bkw = group // (32 // bits) * (1 if split == 2 else 2)
    config = {"BN": 16, "BKW": bkw, "SPLIT_K": split, "NUM_STAGES": 3 if split == 3 else 1}
    y = dequant_linear_triton(x, qw, b, config=config, path="gemv")
    assert y.shape == (m, 40) and not y.isnan().any()
    assert _rel(y, ref) < 2e-3  # fp16 output rounding only


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (40, 96 * 32)])
def test_gemv_autotune_space_fits_the_kernel(bits, group, n, k):
    """Every tuned GEMV tile covers whole groups and every split whole tiles (the kernel relies on both)."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    kw = k * bits // 32
    configs = dl._prune_gemv(dl.GEMV_CONFIGS, {"BITS": bits, "GROUP": group, "KW": kw, "N": n})
    assert configs
    for c in configs:
        assert c.kwargs["BKW"] * 32 // bits % group == 0 and kw % (c.kwargs["SPLIT_K"] * c.kwargs["BKW"]) == 0


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits,group", [(4, 32), (2, 32), (2, 64), (4, 128)])
def test_gemv_space_is_never_empty(bits, group):
    """K = 3 small groups (12 or 6 words) fits no tuned tile width: the space falls back to one-group tiles
    (on the GPU the first M = 1 call of such a shape failed with "max() arg is an empty sequence")."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    kw = 3 * group * bits // 32
    configs = dl._prune_gemv(dl.GEMV_CONFIGS, {"BITS": bits, "GROUP": group, "KW": kw, "N": 40})
    assert configs
    for c in configs:
        assert c.kwargs["BKW"] * 32 // bits % group == 0 and kw % (c.kwargs["SPLIT_K"] * c.kwargs["BKW"]) == 0



@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (2, 64), (2, 128)])
@pytest.mark.parametrize("m,bias,dtype,split", [(1, True, torch.bfloat16, 4), (3, False, torch.float16, 1),
                                                (17, True, torch.bfloat16, 2)])
def test_mma_kernel_matches_reference(bits, group, m, bias, dtype, split):
    """The weight-stationary tensor-core kernel (x in MMA order, codes exact in x's dtype, scale and min applied
    per group in fp32): N = 72 is not a multiple of BN = 64, K = 4 groups in 1..4 splits; M = 17 is one BM = 32
    tile with rows masked."""
    x, qw, b, ref = _case(m, 72, 4 * group, bits, group, dtype=dtype, bias=bias, seed=bits * group + m)
    y = dequant_linear_triton(x, qw, b, config={"BN": 64, "SPLIT_K": split}, path="mma")
    assert y.shape == (m, 72) and y.dtype == dtype and not y.isnan().any()
    # only the output rounding: the products and sums are exact or fp32
    assert _rel(y, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-3)



def _spy_launches(monkeypatch, dl, name: str, log: list) -> None:
    """dl.<name> (a kernel or an autotuner) replaced by a proxy that appends `name` to `log` at each launch."""
    real = getattr(dl, name)

    class Spy:
        def __getitem__(self, grid):
            log.append(name)
            return real[grid]

        def __getattr__(self, attr):  # e.g. the autotuner's best_config
            return getattr(real, attr)

    monkeypatch.setattr(dl, name, Spy())


@needs_kernel
@pytest.mark.parametrize("path", ["gemv", "mma", "fused"])
def test_split_k_partials_are_added_into_y_unless_deterministic(path, monkeypatch):
    """A decode config that splits K with ADD adds each split's partial into y (zeroed by the chain's prep kernel,
    or for the matmul kernel by torch.zeros) and launches no reduction; without ADD, or under
    torch.use_deterministic_algorithms(True), the kernel writes fp32 partials and reduces them in a fixed order.
    fp16: the interpreter has no bf16 atomics (bf16 reduces there)."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    m, n = (1, 40) if path == "gemv" else (5, 72)
    x, qw, b, ref = _case(m, n, 4 * 128, 2, 128, dtype=torch.float16, seed=3)
    reductions = []
    _spy_launches(monkeypatch, dl, "_splitk_reduce_kernel", reductions)
    config = {"gemv": {"BN": 16, "BKW": 8, "SPLIT_K": 4}, "mma": {"BN": 64, "SPLIT_K": 4},
              "fused": {"BM": 8, "BN": 16, "BKW": 8, "SPLIT_K": 4, "USE_DOT": False}}[path]
    adds = dict(config, ADD=True)
    added = dequant_linear_triton(x, qw, b, config=adds, path=path)
    assert reductions == [] and _rel(added, ref) < 3e-3  # each partial rounded to fp16 before its add
    reduced = dequant_linear_triton(x, qw, b, config=config, path=path)
    assert len(reductions) == 1 and _rel(reduced, ref) < 1e-3  # one rounding
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(dequant_linear_triton(x, qw, b, config=adds, path=path), reduced)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(reductions) == 2
    dequant_linear_triton(x.bfloat16(), qw, b.bfloat16(), config=adds, path=path)
    assert len(reductions) == (2 if DEV == "cuda" else 3)


@needs_kernel
def test_eager_decode_calls_relaunch_the_first_calls_config_adding_partials(monkeypatch):
    """The first eager decode call of a key runs the autotuner (on the interpreter: fixed split-K tiles) and
    reduces its partials; later calls of that key launch the config that ran directly, adding the partials into
    y: one launch, no autotuner dispatch, no reduction. Mid-M rows are not remembered."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    monkeypatch.setattr(dl, "_MM_PICKED", {})
    launches = []
    for name in ("_splitk_reduce_kernel", "_dq_mm_tuned"):
        _spy_launches(monkeypatch, dl, name, launches)
    x, qw, b, ref = _case(3, 40, 4 * 128, 4, 128, dtype=torch.float16, seed=9)
    first = dequant_linear_triton(x, qw, b, path="fused")
    assert _rel(first, ref) < 1e-3
    (key, cfg), = dl._MM_PICKED.items()
    assert key[:6] == (4, 40, 512, 4, 128, True) and cfg["ADD"] is True
    split = cfg["SPLIT_K"] > 1
    if DEV == "cpu":
        assert launches == ["_splitk_reduce_kernel"] and split  # the interpreter's tiles split K in two
    else:
        assert launches[0] == "_dq_mm_tuned" and launches[1:] == ["_splitk_reduce_kernel"] * split
    launches.clear()
    again = dequant_linear_triton(x, qw, b, path="fused")
    assert launches == [] and _rel(again, ref) < (3e-3 if split else 1e-3)  # each partial rounded to fp16
    dequant_linear_triton(torch.cat([x] * 11), qw, b, path="fused")  # M = 33: mid rows
    assert len(dl._MM_PICKED) == 1


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (72, 4 * 128)])
def test_mma_autotune_space_fits_the_kernel(group, n, k):
    """Every tuned split of the MMA kernel covers whole groups; real shapes get 1 to MAX_PER_SM programs an H100 SM."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    configs = dl._prune_mma(dl.MMA_CONFIGS, {"GROUP": group, "K": k, "N": n})
    assert configs
    for c in configs:
        assert (k // group) % c.kwargs["SPLIT_K"] == 0
        if n > 1000:
            assert dl.MIN_PROGRAMS <= -(-n // c.kwargs["BN"]) * c.kwargs["SPLIT_K"] <= dl.MAX_PER_SM * dl.MIN_PROGRAMS


@needs_kernel
@pytest.mark.parametrize("bits,group,kernel", [(4, 32, "_launch_mma"), (2, 64, "_launch_mma"),
                                               (2, 32, "_launch_mm")])
def test_auto_path_takes_the_mma_kernel_where_it_can(bits, group, kernel, monkeypatch):
    """When the chains serve (graph capture), rows 2..LARGE_M - 1 go to the MMA kernel, 2-bit groups of 32
    (2 words a group) to the matmul kernel."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    x, qw, b, ref = _case(5, 64, 4 * group, bits, group, seed=group)
    calls = []
    real = getattr(dl, kernel)
    monkeypatch.setattr(dl, kernel, lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dl, "_chain_now", lambda kind, *a: kind == "mma")
    y = dequant_linear_triton(x, qw, b)
    assert calls == [1] and _rel(y, ref) < 1e-2


def test_chains_serve_under_capture_and_the_first_eager_call_of_a_shape(monkeypatch):
    """Eagerly, a chain runs once per (kernel, shape, M bucket) to tune it; under capture always; never on CPU."""
    from types import SimpleNamespace

    dl = importlib.import_module("ttha.kernels.dequant_linear")
    monkeypatch.setattr(dl, "_CHAIN_TUNED", set())
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    qw = quantize(torch.randn(8, 64), 4, 32)
    x = lambda m: SimpleNamespace(is_cuda=True, shape=(m, 64), dtype=torch.bfloat16, device="cuda:0")  # noqa: E731
    assert dl._chain_now("mma", x(16), qw, None) and not dl._chain_now("mma", x(16), qw, None)
    assert not dl._chain_now("mma", x(9), qw, None)  # same M bucket (16): tuned already
    assert dl._chain_now("mma", x(4), qw, None) and dl._chain_now("gemv", x(16), qw, None)
    capturing["on"] = True
    assert dl._chain_now("mma", x(16), qw, None)
    assert not dl._chain_now("mma", SimpleNamespace(is_cuda=False), qw, None)

@needs_kernel
def test_mma_path_refuses_two_bit_groups_of_32():
    x, qw, b, _ = _case(1, 16, 64, 2, 32)
    with pytest.raises(ValueError, match="group_size=32"):
        dequant_linear_triton(x, qw, b, path="mma")

@needs_kernel
def test_fp16_leading_dims_and_tile_config():
    x, qw, b, ref = _case(0, 48, 256, 4, 64, dtype=torch.float16, lead=(2, 3), seed=7)
    y = dequant_linear_triton(x, qw, b, config={"BM": 8, "BN": 32, "BKW": 16, "SPLIT_K": 1, "USE_DOT": False})
    assert y.shape == (2, 3, 48) and y.dtype == torch.float16
    assert _rel(y, ref) < 2e-3  # fp16 output rounding only


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_tensor_core_tiles_of_whole_groups(bits, dtype, group):
    """Tensor-core decode tiles spanning several groups (scales repeated over their words in registers) or
    inside one, for both input dtypes."""
    config = {"BM": 16, "BN": 16, "BKW": 8 * 4 // bits, "SPLIT_K": 2, "USE_DOT": True}
    x, qw, b, ref = _case(13, 40, 4 * 128, bits, group, dtype=dtype, seed=bits + group)
    y = dequant_linear_triton(x, qw, b, config=config)
    assert y.dtype == dtype and not y.isnan().any()
    assert _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)  # operand and output rounding


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("config", [
    {"BM": 1, "BN": 16, "BKW": 32, "SPLIT_K": 1, "USE_DOT": False},  # decode, FMA units
    {"BM": 2, "BN": 16, "BKW": 16, "SPLIT_K": 2, "USE_DOT": False, "PLANES": True},  # decode, FMA by planes
    {"BM": 4, "BN": 16, "BKW": 16, "SPLIT_K": 4, "USE_DOT": False},  # decode, split-K + reduce kernel
    {"BM": 16, "BN": 32, "BKW": 16, "SPLIT_K": 3, "USE_DOT": True},  # tensor cores, uneven split
    {"BM": 32, "BN": 16, "BKW": 16, "SPLIT_K": 1, "USE_DOT": True},  # mid-M tiles
])
def test_every_tile_regime_matches_reference(bits, config):
    m = config["BM"] if config["BM"] > 1 else 1
    x, qw, b, ref = _case(m - (m > 1), 40, 256, bits, 64, seed=bits + config["BM"])  # M just under the tile
    y = dequant_linear_triton(x, qw, b, config=config)
    assert not y.isnan().any() and _rel(y, ref) < 1e-2


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
def test_dequantize_kernel_is_exact_and_large_m_uses_it(bits, monkeypatch):
    dl = importlib.import_module("ttha.kernels.dequant_linear")  # the module (the package exports the function)
    x, qw, b, ref = _case(5, 40, 256, bits, 32, seed=11)
    assert torch.equal(dl.dequantize_triton(qw, torch.float32), dequantize(qw))  # same FMA order as quant.py
    calls = []
    monkeypatch.setattr(dl, "LARGE_M", 4)  # route this small M through the large-M path
    monkeypatch.setattr(dl, "dequantize_triton", lambda q, dt: calls.append(dt) or dequantize(q, dt))
    y = dequant_linear_triton(x, qw, b)
    assert calls == [x.dtype] and _rel(y, ref) < 1e-2


@needs_kernel
def test_dispatch_switch_runs_kernel_or_reference():
    x, qw, b, ref = _case(2, 32, 128, 2, 32, seed=3)
    try:
        _backend.set_backend("torch")
        assert not _backend.use_triton(x)
        y_ref = dequant_linear(x, qw, b)
        _backend.set_backend("triton")
        assert _backend.use_triton(x)
        y_tri = dequant_linear(x, qw, b)
    finally:
        _backend.set_backend("auto")
    assert _backend.use_triton(x) == (DEV == "cuda")
    assert _rel(y_ref, ref) < 1e-2 and _rel(y_tri, ref) < 1e-2


def test_backend_name_is_validated():
    with pytest.raises(ValueError, match="backend"):
        _backend.set_backend("cuda")


@pytest.mark.parametrize("mutate,name", [
    (lambda x, qw, b: (x.float(), qw, b), "x: dtype"),
    (lambda x, qw, b: (x[:, :64], qw, b), "x: last dim"),
    (lambda x, qw, b: (x, qw, b[:5]), "bias"),
    (lambda x, qw, b: (x, "w", b), "qweight"),
    (lambda x, qw, b: (x, type(qw)(qw.packed, qw.scales, qw.mins, 3, qw.group_size, qw.shape), b), "qweight.bits"),
    (lambda x, qw, b: (x, type(qw)(qw.packed, qw.scales, qw.mins, 4, 48, qw.shape), b), "qweight.group_size"),
    (lambda x, qw, b: (x, type(qw)(qw.packed, qw.scales, qw.mins, 4, 64, (32, 96)), b), "qweight"),
    # the row-major words and [N, NG] scales of earlier versions are refused, not read wrongly
    (lambda x, qw, b: (x, type(qw)(row_words(qw), qw.scales, qw.mins, 4, 32, qw.shape), b), "qweight.packed"),
    (lambda x, qw, b: (x, type(qw)(qw.packed, qw.scales.t().contiguous(), qw.mins, 4, 32, qw.shape), b),
     "qweight.scales"),
])
def test_bad_arguments_raise_value_error_naming_them(mutate, name):
    x, qw, b, _ = _case(2, 32, 128, 4, 32)
    args = mutate(x, qw, b)
    with pytest.raises(ValueError, match=name):
        dequant_linear(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 16, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(bits, m, dtype):
    x, qw, b, ref = _case(m, 14336, 4096, bits, 128, dtype=dtype, seed=m)
    y = dequant_linear(x, qw, b)
    assert y.dtype == dtype and _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3)  # operand, output rounding



@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mma_kernel_real_sizes(bits, m, dtype):
    x, qw, b, ref = _case(m, 4096, 14336, bits, 128, dtype=dtype, seed=m + 7)
    y = dequant_linear_triton(x, qw, b, path="mma")
    assert y.dtype == dtype and _rel(y, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-3)  # output rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_decode_rows_under_graph_capture_use_the_chain_kernels(bits, m):
    """M = 1 (the GEMV) and M = 16 (the MMA kernel) captured in a CUDA graph take their chain kernels (eager
    calls the one-launch matmul kernel): both match."""
    x, qw, b, ref = _case(m, 14336, 4096, bits, 128, seed=5)
    dequant_linear(x, qw, b)  # warm-up: the first eager call of a shape tunes the chain
    eager = dequant_linear(x, qw, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dequant_linear(x, qw, b)
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(captured, ref) < 1e-2 and _rel(eager, ref) < 1e-2
    assert not torch.equal(captured, eager)  # a different kernel (summation order) ran under capture


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,kind", [(1, "gemv"), (16, "mma")])
def test_gpu_first_eager_call_tunes_the_whole_chain_and_the_capture_uses_it(m, kind, tmp_path, monkeypatch):
    """The first eager call of a shape times every config's whole chain from CUDA graphs and stores the fastest;
    the capture then launches that config (a capture cannot time anything)."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    tuning = importlib.import_module("ttha.kernels.tuning")
    monkeypatch.setenv("TTHA_CHAIN_CACHE", str(tmp_path / "chain.json"))
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(dl, "_CHAIN_TUNED", set())
    x, qw, b, ref = _case(m, 2048, 1024, 4, 128, seed=11)
    assert _rel(dequant_linear(x, qw, b), ref) < 1e-2
    stored = json.loads((tmp_path / "chain.json").read_text())
    (key, cfg), = stored.items()
    assert f"|{kind}|" in key and "SPLIT_K" in cfg and "num_warps" in cfg
    launched = []
    real = dl._launch_split_k
    monkeypatch.setattr(dl, "_launch_split_k", lambda *a, **k: launched.append(a[6]) or real(*a, **k))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dequant_linear(x, qw, b)
    graph.replay()
    torch.cuda.synchronize()
    assert launched == [cfg] and _rel(y, ref) < 1e-2


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m_bucket", [1, 2, 4, 8, 16, 32, 512])
def test_autotune_space_fits_each_regime(bits, group, m_bucket):
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    configs = dl._prune(dl.DECODE_CONFIGS + dl.MID_CONFIGS, {"M_BUCKET": m_bucket}, BITS=bits, GROUP=group)
    assert configs
    for c in configs:
        kw = c.kwargs
        if kw["USE_DOT"]:  # tensor cores: decode tiles only for decode, a bounded unpacked tile
            assert (kw["BM"] == 16) == (m_bucket <= dl.SMALL_M) and kw["BKW"] * (32 // bits) <= dl.MAX_DOT_BK
        else:  # FMA: rows = the M bucket, [BM, BN, BK] accumulator within 64 fp32 registers a thread
            assert kw["BM"] == m_bucket <= dl.SMALL_M
            acc = kw["BM"] * kw["BN"] * kw["BKW"] * (1 if kw["PLANES"] else 32 // bits)
            assert acc <= 64 * 32 * c.num_warps


def _half(bits: int, bf16: bool) -> float:
    """A 16-bit fp16/bf16 bit pattern as a float."""
    if bf16:
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _to_half(v: float, bf16: bool) -> int:
    """v rounded once (to nearest even) to fp16/bf16, as its bit pattern."""
    if not bf16:
        return int(np.array([v], dtype=np.float16).view(np.uint16)[0])
    u = int(np.array([v], dtype=np.float32).view(np.uint32)[0])  # exact here: the test's values fit fp32
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def _simulate_ptx(ptx: str, regs: dict) -> dict:
    """A tiny simulator for the handful of PTX instructions the kernels' inline PTX uses: integer registers as
    bit patterns, each half2 op rounded once as the hardware does. So the CPU suite checks the PTX the GPU
    runs. `regs` holds the operands ($1, ...); returns every register."""
    import re

    regs = dict(regs)
    halves = lambda r, bf: (_half(regs[r] & 0xFFFF, bf), _half(regs[r] >> 16, bf))  # noqa: E731
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        if split := re.fullmatch(r"mov\.b32 \{(\S+), (\S+)\}, (\S+)", line):  # a register into two halves
            regs[split[1]], regs[split[2]] = regs[split[3]] & 0xFFFF, regs[split[3]] >> 16
            continue
        if pack := re.fullmatch(r"mov\.b32 (\S+), \{(\S+), (\S+)\}", line):  # two halves into a register
            regs[pack[1]] = (regs[pack[2]] & 0xFFFF) | (regs[pack[3]] & 0xFFFF) << 16
            continue
        op, *a = re.split(r"[\s,]+", line)
        if op == "mov.b32":
            regs[a[0]] = int(a[1], 16)
        elif op == "lop3.b32":  # 0xEA: (a & b) | c
            assert a[4] == "0xEA"
            regs[a[0]] = (regs[a[1]] & int(a[2], 16)) | regs[a[3]]
        elif op == "and.b32":
            regs[a[0]] = regs[a[1]] & int(a[2], 16)
        elif op == "shr.u32":
            regs[a[0]] = regs[a[1]] >> int(a[2])
        elif op.endswith(("f16x2", "bf16x2")):
            bf = op.endswith("bf16x2")
            xs = [halves(r, bf) for r in a[1:]]
            f = {"sub": lambda p, q: p - q, "mul": lambda p, q: p * q,
                 "fma": lambda p, q, c: p * q + c}[op.split(".")[0]]
            lo, hi = (_to_half(f(*(x[i] for x in xs)), bf) for i in (0, 1))
            regs[a[0]] = lo | hi << 16
        elif op == "cvt.rn.bf16x2.f32":  # the first source into the high half
            regs[a[0]] = _to_half(regs[a[2]], True) | _to_half(regs[a[1]], True) << 16
        elif op == "cvt.f32.f16":
            regs[a[0]] = _half(regs[a[1]], False)
        elif op == "add.f32":
            regs[a[0]] = float(np.float32(regs[a[1]]) + np.float32(regs[a[2]]))
        else:
            raise AssertionError(f"unsimulated PTX: {line}")
    return regs


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_ptx_gives_codes_in_k_order(bits, bf16):
    """The PTX the decode matmul dequantizes with on CUDA, simulated: each code of random words comes out as
    code * scale + min (fp16 scale and min, as stored) rounded once to fp16 (then to bf16 for bf16 x), at the
    output that the kernel's tl.join tree (stack along a new last axis) and reshape put back at the code's
    K position."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    rng = np.random.default_rng(bits + 2 * bf16)
    pw, ptx = 32 // bits, dl._dequant_ptx(bits, bf16)
    for _ in range(30):
        codes = rng.integers(0, 2**bits, pw)
        word = sum(int(c) << (bits * j) for j, c in enumerate(codes))
        s, m = (_to_half(v, False) for v in (rng.uniform(1e-3, 0.1), rng.uniform(-1, 1)))
        regs = _simulate_ptx(ptx, {f"${pw}": word, f"${pw + 1}": s, f"${pw + 2}": m})
        outs = [np.array(_half(regs[f"${o}"], bf16)) for o in range(pw)]
        # _join8 (and the outer join for int2): tl.join stacks along a new last axis
        j8 = lambda c: np.stack([np.stack([np.stack(c[0:2], -1), np.stack(c[2:4], -1)], -1),  # noqa: E731
                                 np.stack([np.stack(c[4:6], -1), np.stack(c[6:8], -1)], -1)], -1)
        w = (j8(outs) if bits == 4 else np.stack([j8(outs[:8]), j8(outs[8:])], -1)).reshape(-1)
        w16 = [_half(_to_half(float(c) * _half(s, False) + _half(m, False), False), False) for c in codes]
        want = [_half(_to_half(v, True), True) for v in w16] if bf16 else w16
        assert list(w) == want, (codes, list(w), want)
        if bf16:  # within a bf16 plus an fp16 rounding of the exact value (the reference: one bf16 rounding)
            exact = codes * _half(s, False) + _half(m, False)
            assert np.all(np.abs(np.array(w) - exact) <= (2.0**-8 + 2.0**-11) * np.abs(exact) + 1e-7)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
def test_word_dot_ptx_sums_code_times_x(bits):
    """The PTX the GEMV runs on CUDA, simulated: every code of random words, read in place as an fp16 subnormal
    and times x's half2 pairs (a group at +-2**15, times 2**-pos, as _x_pairs_kernel writes them), sums to
    2**-24 sum_j code_j * x_j, within fp16 rounding of the partial sums."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    rng = np.random.default_rng(bits)
    pw, ptx = 32 // bits, dl._word_dot_ptx(bits)
    for _ in range(50):
        codes = rng.integers(0, 2**bits, pw)
        x = rng.uniform(-2**15, 2**15, pw)
        word = sum(int(c) << (bits * j) for j, c in enumerate(codes))
        pairs = []
        for p, (_sh, pos) in enumerate(dl._pair_shifts(bits)):
            lo, hi = np.float16(x[p] * 2.0**-pos), np.float16(x[p + pw // 2] * 2.0**-pos)
            pairs.append(int(np.array([lo, hi]).view(np.uint32)[0]))
        exact = float(sum(codes * x)) * 2.0**-24
        got = _simulate_ptx(ptx, {"$1": word, **{f"${i + 2}": q for i, q in enumerate(pairs)}})["$0"]
        assert abs(got - exact) <= 2e-3 * float(np.sum(np.abs(codes * x))) * 2.0**-24 + 2.0**-24, (codes, x, got, exact)



@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_codes_ptx_and_joins_give_the_mma_order(bits, bf16):
    """The PTX _mma_kernel unpacks words with on CUDA, simulated, then _mma_codes' joins, permute and reshape
    (numpy's stack and transpose): every code of a 4-word block comes out exact, as magic + code in x's dtype,
    at the place mma_order gives its K column, where _x_mma_kernel puts x's value (checked on the kernel below)."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    rng = np.random.default_rng(bits + 2 * bf16)
    pw, ptx, magic = 32 // bits, dl._codes_ptx(bits, bf16), _half(dl.MMA_MAGIC[bf16], bf16)
    order = dl.mma_order(bits, 4 * pw).numpy()
    for _ in range(10):
        codes = rng.integers(0, 2**bits, (4, pw))  # 4 words
        outs = np.zeros((pw, 4))
        for w in range(4):
            word = sum(int(c) << (bits * j) for j, c in enumerate(codes[w]))
            regs = _simulate_ptx(ptx, {f"${pw}": word})
            outs[:, w] = [_half(regs[f"${o}"], bf16) for o in range(pw)]
        pairs = [np.stack([outs[2 * j], outs[2 * j + 1]], -1) for j in range(pw // 2)]  # tl.join: a new last axis
        v = np.stack([np.stack(pairs[0:2], -1), np.stack(pairs[2:4], -1)], -1)
        if bits == 4:
            v = v.reshape(1, 4, 2, 2, 2).transpose(0, 4, 3, 1, 2)
        else:
            v = np.stack([v, np.stack([np.stack(pairs[4:6], -1), np.stack(pairs[6:8], -1)], -1)], -1)
            v = v.reshape(1, 4, 2, 2, 2, 2).transpose(0, 5, 4, 3, 1, 2)
        got = v.reshape(-1)[order]  # K order back
        assert list(got) == list(magic + codes.reshape(-1).astype(float))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_x_mma_kernel_writes_x_in_mma_order_group_sums_and_zeros_y(bits, dtype):
    """x in MMA order and each group's sum; with ZERO, y's rows cleared for the main kernel's split-K adds (every
    element, though N = 100 is not a multiple of the programs)."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    m, k, group, n = 3, 1024, 64, 100
    x = torch.randn(m, k).to(DEV, dtype)
    kw, ng = k * bits // 32, k // group
    xv = torch.empty_like(x)
    xs = torch.empty((ng, m), dtype=torch.float32, device=DEV)
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    programs = kw // 32
    dl._x_mma_kernel[(programs, m)](x, xv, xs, y, m, kw, ng, n, x.stride(0), BITS=bits, GROUP=group, BKW=32,
                                    ZERO=True)
    assert torch.equal(xv[:, dl.mma_order(bits, k).to(DEV)], x)
    torch.testing.assert_close(xs, x.float().reshape(m, ng, group).sum(-1).T, rtol=1e-5, atol=1e-5)
    assert programs > 1 and torch.equal(y, torch.zeros_like(y))
