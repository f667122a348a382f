"""The dequant-linear dispatch (dequant_linear.py): the auto path against its reference, split-K sums, eager
decode calls, which kernel serves which M, the backend switch and argument errors (Triton interpreter on CPU,
real sizes on GPU)."""
import importlib
import json

import pytest
import torch

from dequant_cases import DEV, case, needs_kernel, rel
from ttha.kernels import _backend, _common, dequant_linear, dequant_linear_ref, dequant_linear_triton, fused
from ttha.kernels.quant import dequantize, quantize, row_words


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,bias", [(1, True), (3, False), (17, True)])
def test_matches_reference(bits, group, m, bias):
    # N = 40: not a multiple of the 16-wide tile; K = 3 groups: not a multiple of the 128-wide K tile
    x, qw, b, ref = case(m, 40, 3 * group, bits, group, bias=bias, seed=bits + group + m)
    y = torch.full((m, 40), float("nan"), dtype=x.dtype, device=DEV)  # poisoned: every element must be written
    y = dequant_linear_triton(x, qw, b)
    assert y.shape == (m, 40) and y.dtype == x.dtype and not y.isnan().any()
    assert rel(y, ref) < 1e-2  # bf16 output rounding (~4e-3)
    assert rel(y, dequant_linear_ref(x, qw, b)) < 1e-2


def _spy_launches(monkeypatch, module, name: str, log: list) -> None:
    """module.<name> (a kernel or an autotuner) replaced by a proxy that appends `name` to `log` at each launch."""
    real = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            log.append(name)
            return real[grid]

        def __getattr__(self, attr):  # e.g. the autotuner's best_config
            return getattr(real, attr)

    monkeypatch.setattr(module, name, Spy())


@needs_kernel
@pytest.mark.parametrize("path", ["gemv", "mma", "fused"])
def test_split_k_partials_are_added_into_y_unless_deterministic(path, monkeypatch):
    """A decode config that splits K with ADD adds each split's partial into y (zeroed by the chain's prep kernel,
    or for the matmul kernel by torch.zeros) and launches no reduction; without ADD, or under
    torch.use_deterministic_algorithms(True), the kernel writes fp32 partials and reduces them in a fixed order.
    fp16: the interpreter has no bf16 atomics (bf16 reduces there)."""
    m, n = (1, 40) if path == "gemv" else (5, 72)
    x, qw, b, ref = case(m, n, 4 * 128, 2, 128, dtype=torch.float16, seed=3)
    reductions = []
    _spy_launches(monkeypatch, _common, "_splitk_reduce_kernel", reductions)
    config = {"gemv": {"BN": 16, "BKW": 8, "SPLIT_K": 4}, "mma": {"BN": 64, "SPLIT_K": 4},
              "fused": {"BM": 8, "BN": 16, "BKW": 8, "SPLIT_K": 4, "USE_DOT": False}}[path]
    adds = dict(config, ADD=True)
    added = dequant_linear_triton(x, qw, b, config=adds, path=path)
    assert reductions == [] and rel(added, ref) < 3e-3  # each partial rounded to fp16 before its add
    reduced = dequant_linear_triton(x, qw, b, config=config, path=path)
    assert len(reductions) == 1 and rel(reduced, ref) < 1e-3  # one rounding
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
    for module, name in ((_common, "_splitk_reduce_kernel"), (fused, "_dq_mm_tuned")):
        _spy_launches(monkeypatch, module, name, launches)
    x, qw, b, ref = case(3, 40, 4 * 128, 4, 128, dtype=torch.float16, seed=9)
    first = dequant_linear_triton(x, qw, b, path="fused")
    assert rel(first, ref) < 1e-3
    (key, cfg), = dl._MM_PICKED.items()
    assert key[:6] == (4, 40, 512, 4, 128, True) and cfg["ADD"] is True
    split = cfg["SPLIT_K"] > 1
    if DEV == "cpu":
        assert launches == ["_splitk_reduce_kernel"] and split  # the interpreter's tiles split K in two
    else:
        assert launches[0] == "_dq_mm_tuned" and launches[1:] == ["_splitk_reduce_kernel"] * split
    launches.clear()
    again = dequant_linear_triton(x, qw, b, path="fused")
    assert launches == [] and rel(again, ref) < (3e-3 if split else 1e-3)  # each partial rounded to fp16
    dequant_linear_triton(torch.cat([x] * 11), qw, b, path="fused")  # M = 33: mid rows
    assert len(dl._MM_PICKED) == 1


@needs_kernel
@pytest.mark.parametrize("bits,group,kernel", [(4, 32, "_launch_mma"), (2, 64, "_launch_mma"),
                                               (2, 32, "_launch_mm")])
def test_auto_path_takes_the_mma_kernel_where_it_can(bits, group, kernel, monkeypatch):
    """When the chains serve (graph capture), rows 2..LARGE_M - 1 go to the MMA kernel, 2-bit groups of 32
    (2 words a group) to the matmul kernel."""
    dl = importlib.import_module("ttha.kernels.dequant_linear")
    x, qw, b, ref = case(5, 64, 4 * group, bits, group, seed=group)
    calls = []
    real = getattr(dl, kernel)
    monkeypatch.setattr(dl, kernel, lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dl, "_chain_now", lambda kind, *a: kind == "mma")
    y = dequant_linear_triton(x, qw, b)
    assert calls == [1] and rel(y, ref) < 1e-2


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
@pytest.mark.parametrize("bits", [4, 2])
def test_dequantize_kernel_is_exact_and_large_m_uses_it(bits, monkeypatch):
    dl = importlib.import_module("ttha.kernels.dequant_linear")  # the module (the package exports the function)
    x, qw, b, ref = case(5, 40, 256, bits, 32, seed=11)
    assert torch.equal(dl.dequantize_triton(qw, torch.float32), dequantize(qw))  # same FMA order as quant.py
    calls = []
    monkeypatch.setattr(dl, "LARGE_M", 4)  # route this small M through the large-M path
    monkeypatch.setattr(dl, "dequantize_triton", lambda q, dt: calls.append(dt) or dequantize(q, dt))
    y = dequant_linear_triton(x, qw, b)
    assert calls == [x.dtype] and rel(y, ref) < 1e-2


@needs_kernel
def test_dispatch_switch_runs_kernel_or_reference():
    x, qw, b, ref = case(2, 32, 128, 2, 32, seed=3)
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
    assert rel(y_ref, ref) < 1e-2 and rel(y_tri, ref) < 1e-2


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
    x, qw, b, _ = case(2, 32, 128, 4, 32)
    args = mutate(x, qw, b)
    with pytest.raises(ValueError, match=name):
        dequant_linear(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 16, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(bits, m, dtype):
    x, qw, b, ref = case(m, 14336, 4096, bits, 128, dtype=dtype, seed=m)
    y = dequant_linear(x, qw, b)
    assert y.dtype == dtype and rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3)  # operand, output rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_decode_rows_under_graph_capture_use_the_chain_kernels(bits, m):
    """M = 1 (the GEMV) and M = 16 (the MMA kernel) captured in a CUDA graph take their chain kernels (eager
    calls the one-launch matmul kernel): both match."""
    x, qw, b, ref = case(m, 14336, 4096, bits, 128, seed=5)
    dequant_linear(x, qw, b)  # warm-up: the first eager call of a shape tunes the chain
    eager = dequant_linear(x, qw, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dequant_linear(x, qw, b)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(captured, ref) < 1e-2 and rel(eager, ref) < 1e-2
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
    x, qw, b, ref = case(m, 2048, 1024, 4, 128, seed=11)
    assert rel(dequant_linear(x, qw, b), ref) < 1e-2
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
    assert launched == [cfg] and rel(y, ref) < 1e-2
