"""Group-wise 4/2-bit dequantize + linear: y = x @ dequant(qw).T (+ bias), and the dispatch over its kernels.

Weight format (quant.py): codes packed along K in int32 words, code j of a word in bits [bits*j, bits*(j+1)), one
fp16 (scale, min) per group of `group_size` values along K; the words stored in tiles of TILE_ROWS rows, (scale,
min) group-major [NG, N].

Four regimes, picked from M (rows of x):

- M <= GEMV_M (decode, one row) under CUDA graph capture, and once per shape eagerly to tune it before a capture:
  the GEMV chain (gemv.py), x rearranged into fp16 pairs, then the per-row GEMV kernel.
- GEMV_M < M < LARGE_M under CUDA graph capture, and once per shape and M bucket eagerly: the MMA chain (mma.py),
  x rearranged into MMA order, then the weight-stationary tensor-core kernel. Not for 2-bit weights in groups of
  32 (mma_ok).
- Other calls below LARGE_M (eager ones: a chain's extra launches cost more host time than its GPU time saves):
  the fused matmul kernel (fused.py, `path="fused"`), one launch.
- M >= LARGE_M: the dequantize kernel writes the bf16/fp16 weight once, then cuBLAS multiplies (`path="dequant"`):
  one pass over N x K, a small share of the GEMM, where a Triton GEMM that dequantizes in its main loop runs far
  behind cuBLAS.

Both decode chains are tuned as served: each config's whole chain timed from CUDA graphs (tuning.py), not the
main kernel alone. Split-K partials are summed by a second small kernel, or added into y in place (`_split_adds`,
a tuned choice). The torch reference is `dequant_linear_ref`.
"""
from __future__ import annotations

import torch

from . import _common, fused, gemv, mma, tuning
from ._backend import interpreting, triton
from .fused import SMALL_M  # at or below: decode rows (the fused kernel's decode tiles, defined beside them)
from .quant import TILE_ROWS, QuantizedWeight, dequantize

GEMV_M = 1      # at or below, under CUDA graph capture: the GEMV chain; eager calls keep the one-launch fused
                # kernel (the chain's three launches cost more host time than its GPU time saves)
LARGE_M = 128   # at or above: dequantize once, then cuBLAS (one pass over the weight, a small share of the GEMM);
                # below, the MMA chain under graph capture and the fused kernel eagerly (kernels/BENCHMARKS.md)
MAX_SPLIT_K = 8  # largest split in the tuned configs (sizes the partial-sum buffer)


def dequant_linear_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: dequantize to x's dtype, then F.linear."""
    w = dequantize(qw, torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_args(x, qw, bias) -> None:
    """ValueError naming the argument for anything the kernel and the reference cannot take."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qweight: expected a ttha.kernels.quant.QuantizedWeight, got {type(qw).__name__}")
    if qw.bits not in (2, 4):
        raise ValueError(f"qweight.bits={qw.bits}: must be 2 or 4")
    if qw.group_size not in (32, 64, 128):
        raise ValueError(f"qweight.group_size={qw.group_size}: must be 32, 64 or 128")
    n, k = qw.shape
    if k % qw.group_size:
        raise ValueError(f"qweight: K={k} is not a multiple of group_size={qw.group_size}")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x: dtype must be bfloat16 or float16, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dim must be K={k}, got shape {tuple(x.shape)}")
    if qw.packed.device != x.device:
        raise ValueError(f"qweight: on {qw.packed.device}, x on {x.device}")
    ng = k // qw.group_size
    tiles = (-(-n // TILE_ROWS), ng, TILE_ROWS, qw.group_size * qw.bits // 32)
    if tuple(qw.packed.shape) != tiles or qw.packed.dtype != torch.int32 or not qw.packed.is_contiguous():
        raise ValueError(f"qweight.packed: expected contiguous int32 {tiles}, got "
                         f"{qw.packed.dtype} {tuple(qw.packed.shape)}")
    for name in ("scales", "mins"):
        t = getattr(qw, name)
        if tuple(t.shape) != (ng, n) or t.dtype != torch.float16 or not t.is_contiguous():
            raise ValueError(f"qweight.{name}: expected contiguous float16 {(ng, n)}, got {t.dtype} {tuple(t.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, x on {x.device}")


def _m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a new batch size reuses a tuned config."""
    return 1 << max(0, (m - 1).bit_length())


def _launch_split_k(kernel, tuned, grid, inputs: tuple, sizes: tuple, meta: dict, config: dict | None,
                    max_split: int, m: int, n: int, like: torch.Tensor, pdl: bool = False,
                    y: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """y [m, n] in like's dtype (or the `y` given) from `kernel` with `config` (or the autotuned `tuned`), whose
    arguments are (*inputs, y, partials, *sizes); when the config splits K, the fp32 partials are summed into y
    after, or with `add` (`kernel` takes ADD; a given y zeroed before, else created zeroed here) the kernel adds
    them into y itself. grid(config) gives the launch grid. pdl: `kernel` and the reduction are launched as
    programmatic dependents of the kernel before each (`kernel` takes PDL)."""
    if y is None:
        y = (torch.zeros if add else torch.empty)((m, n), dtype=like.dtype, device=like.device)
    partials = (torch.empty((max_split, m, n), dtype=torch.float32, device=like.device) if max_split > 1 and not add
                else y)
    args = (*inputs, y, partials, *sizes)
    pdl_kw = dict(PDL=True, launch_pdl=True) if pdl else {}
    meta = dict(meta, **pdl_kw, **(dict(ADD=True) if add else {}))
    if config is not None:
        kernel[grid(config)](*args, **meta, **{k: v for k, v in config.items() if k != "ADD"})  # ADD: `add`
        split = int(config["SPLIT_K"])
    else:
        tuned[grid](*args, **meta)
        split = int(tuned.best_config.kwargs["SPLIT_K"])
    if split > 1 and not add:
        _common._splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](partials, y, m * n, SPLIT_K=split, BLOCK=1024,
                                                                    **pdl_kw)
    return y


def _decode_key(x2: torch.Tensor, qw: QuantizedWeight, bias) -> tuple:
    """What an eager decode call's tuned config depends on: M bucket, weight shape, bits, group size, bias, x's
    dtype and device."""
    return (_m_bucket(x2.shape[0]), *qw.shape, qw.bits, qw.group_size, bias is not None, x2.dtype, x2.device)


_MM_PICKED: dict[tuple, dict] = {}  # eager decode calls: _decode_key -> the config its first call ran


def _launch_mm(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    """The matmul kernel (autotuned, or `config`), then the split-K reduction when the config splits and does
    not add its partials into y (_split_adds). Eager decode rows (M <= SMALL_M) are autotuned on the first call
    per key; later calls launch the config that ran directly, adding its partials into a zeroed y: no autotuner
    dispatch and no reduction launch, which were most of an eager decode call's host time."""
    m, n, k = x2.shape[0], qw.shape[0], qw.shape[1]
    picked = None
    if config is None and m <= SMALL_M:
        picked = _decode_key(x2, qw, bias)
        config = _MM_PICKED.get(picked)
    if config is None and interpreting():  # small fixed tiles: the interpreter is slow
        config = {"BM": min(_m_bucket(m), 16), "BN": 16, "BKW": 8, "SPLIT_K": 2, "USE_DOT": m > 4}
    # partial sums only where a config may split (decode); mid-M configs never do
    max_split = int(config["SPLIT_K"]) if config is not None else (MAX_SPLIT_K if m <= SMALL_M else 1)
    inputs = (x2, qw.packed, qw.scales, qw.mins, bias if bias is not None else x2)
    meta = dict(BITS=qw.bits, GROUP=qw.group_size, HAS_BIAS=bias is not None, DOT_F32=interpreting(),
                ASM=not interpreting())
    y = _launch_split_k(fused._dq_mm_kernel, fused._dq_mm_tuned,
                        lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(m, c["BM"]), int(c["SPLIT_K"])),
                        inputs, (m, n, k, _m_bucket(m), x2.stride(0)), meta, config, max_split, m, n, x2,
                        add=_split_adds(x2, config))
    if picked is not None and picked not in _MM_PICKED:  # this key's first call: remember the config that ran
        if config is None:
            best = fused._dq_mm_tuned.best_config
            config = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        _MM_PICKED[picked] = dict(config, ADD=True)
    return y


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled (not the interpreter), on Hopper or newer."""
    return (_common.HAS_PDL and not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _split_adds(x2: torch.Tensor, config: dict | None) -> bool:
    """Whether split-K partials are added into y by the main kernel (config ADD; y zeroed by a chain's prep kernel
    or, eagerly, torch.zeros; red.global.add in x's dtype) instead of written in fp32 for a reduction kernel: one
    launch and the partials' round trip fewer, faster for most split tiles but not all, so the chain tuner tries
    both (_chain_config). Each partial is rounded to x's dtype before it is added (relerr 4.7e-3 at
    split 8 against 2.6e-3, bf16), and the order of the adds varies between runs, so never under
    torch.use_deterministic_algorithms(True); nor for bf16 on the interpreter (no bf16 atomics there)."""
    return (config is not None and bool(config.get("ADD")) and int(config["SPLIT_K"]) > 1
            and not torch.are_deterministic_algorithms_enabled()
            and not (interpreting() and x2.dtype == torch.bfloat16))


def _launch_chain(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None, prep, bufs: tuple,
                  prep_sizes: tuple, kernel, tuned, max_split: int, grid, sizes: tuple, **meta) -> torch.Tensor:
    """A decode chain: `prep` rearranges x into `bufs` (one small kernel over BKW words of a row a program,
    whole groups) and zeroes y where the main kernel adds split-K partials into it (_split_adds), then `kernel`
    (autotuned `tuned`, or `config`) reads them, then the split-K reduction when the config splits and does not
    add; launched as programmatic dependents where the GPU has it."""
    m, n = x2.shape[0], qw.shape[0]
    pw = 32 // qw.bits
    bkw_x = max(64, qw.group_size // pw)  # whole groups per program
    pdl = _pdl_ok(x2.device)
    add = _split_adds(x2, config)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    prep[(triton.cdiv(qw.shape[1] // pw, bkw_x), m)](x2, *bufs, y, *prep_sizes, n, x2.stride(0), BITS=qw.bits,
                                                     GROUP=qw.group_size, BKW=bkw_x, PDL=pdl, ZERO=add)
    max_split = int(config["SPLIT_K"]) if config is not None else max_split
    inputs = (*bufs, qw.packed, qw.scales, qw.mins, bias if bias is not None else x2)
    meta = dict(meta, BITS=qw.bits, GROUP=qw.group_size, HAS_BIAS=bias is not None, ASM=not interpreting())
    return _launch_split_k(kernel, tuned, grid, inputs, sizes, meta, config, max_split, m, n, x2, pdl, y, add)


def _chain_config(kind: str, launch, x2: torch.Tensor, qw: QuantizedWeight, bias, space) -> dict | None:
    """The config under which the whole decode chain `launch` ran fastest (tuning.py: tuned on the first eager
    call per shape and M bucket, timed from CUDA graphs over weight copies that span L2, kept on disk); None on
    the interpreter or when nothing was tuned before a capture (then Triton's autotuner, timing the main kernel
    alone, picks). space() gives the pruned triton.Configs, each that splits K tried also with ADD (_split_adds); it
    runs only when tuning, not on the calls (every capture) that find the config remembered."""
    if interpreting() or not x2.is_cuda:
        return None
    sums = "det" if torch.are_deterministic_algorithms_enabled() else "adds"  # split-K sums (_split_adds)
    key = "|".join(str(v) for v in (torch.cuda.get_device_name(x2.device), kind, f"tiles{TILE_ROWS}", sums,
                                    *qw.shape, qw.bits, qw.group_size, "bias" if bias is not None else "nobias",
                                    str(x2.dtype).replace("torch.", ""), _m_bucket(x2.shape[0])))
    copies = []

    def time_us(cfg: dict) -> float:
        if not copies:
            copies.extend(tuning.rotating(lambda: QuantizedWeight(
                qw.packed.clone(), qw.scales.clone(), qw.mins.clone(), qw.bits, qw.group_size, qw.shape), qw.nbytes))
        return tuning.graph_us(lambda q: launch(x2, q, bias, cfg), copies)

    def configs():  # a generator: the space is pruned only if best_config iterates it
        for c in space():
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            yield cfg
            if cfg["SPLIT_K"] > 1 and sums == "adds":  # the same tile adding its partials into y (_split_adds)
                yield dict(cfg, ADD=True)

    return tuning.best_config(key, configs(), time_us)


def _launch_gemv(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    """Decode rows: x's pairs (one small kernel), the GEMV kernel per row, the split-K reduction; with `config`,
    else the chain's tuned config (small fixed tiles on the interpreter, which is slow)."""
    pw = 32 // qw.bits
    kw = qw.shape[1] // pw
    if config is None and interpreting():
        bkw = qw.group_size // pw  # one group
        config = {"BN": 16, "BKW": bkw, "SPLIT_K": 2 if kw % (2 * bkw) == 0 else 1}
    if config is None:
        config = _chain_config("gemv", _run_gemv, x2, qw, bias, lambda: gemv._prune_gemv(
            gemv.GEMV_CONFIGS, {"BITS": qw.bits, "GROUP": qw.group_size, "KW": kw, "N": qw.shape[0]}))
    return _run_gemv(x2, qw, bias, config)


def _run_gemv(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    m, (n, k) = x2.shape[0], qw.shape
    pw = 32 // qw.bits
    kw, ng = k // pw, k // qw.group_size
    xp = torch.empty((m, pw // 2 * kw), dtype=torch.int32, device=x2.device)
    xg = torch.empty((m, 2 * ng), dtype=torch.float32, device=x2.device)
    return _launch_chain(x2, qw, bias, config, gemv._x_pairs_kernel, (xp, xg), (kw, ng), gemv._gemv_kernel,
                         gemv._gemv_tuned, gemv.GEMV_MAX_SPLIT,
                         lambda c: (triton.cdiv(n, c["BN"]), m, int(c["SPLIT_K"])), (m, n, kw, ng))


def _launch_mma(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    """Decode rows on tensor cores: x in MMA order with its group sums (one small kernel), the weight-stationary
    matmul, the split-K reduction when the config splits; with `config`, else the chain's tuned config (small
    fixed tiles on the interpreter)."""
    ng = qw.shape[1] // qw.group_size
    if config is None and interpreting():
        config = {"BN": 64, "SPLIT_K": 2 if ng % 2 == 0 else 1}
    if config is None:
        config = _chain_config("mma", _run_mma, x2, qw, bias, lambda: mma._prune_mma(
            mma.MMA_CONFIGS, {"GROUP": qw.group_size, "K": qw.shape[1], "N": qw.shape[0]}))
    return _run_mma(x2, qw, bias, config)


def _run_mma(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    m, (n, k) = x2.shape[0], qw.shape
    kw, ng = k * qw.bits // 32, k // qw.group_size
    bm = max(16, min(_m_bucket(m), 64))
    xv = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
    xs = torch.empty((ng, m), dtype=torch.float32, device=x2.device)
    return _launch_chain(x2, qw, bias, config, mma._x_mma_kernel, (xv, xs), (m, kw, ng), mma._mma_kernel,
                         mma._mma_tuned, mma.MMA_MAX_SPLIT,
                         lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(m, bm), int(c["SPLIT_K"])),
                         (m, n, k, _m_bucket(m)), DOT_F32=interpreting(), BM=bm)


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`, one coalesced pass (the large-M path's first step)."""
    n, k = qw.shape
    out = torch.empty((n, k), dtype=dtype, device=qw.packed.device)
    pw = 32 // qw.bits
    bn, bkw = (16, 16) if interpreting() else (32, 64)
    grid = (triton.cdiv(n, bn), triton.cdiv(k // pw, bkw))
    fused._dequant_kernel[grid](qw.packed, qw.scales, qw.mins, out, n, k, BITS=qw.bits, GROUP=qw.group_size,
                                BN=bn, BKW=bkw, num_warps=4)
    return out


PATHS = ("auto", "gemv", "mma", "fused", "dequant")
_CHAIN_TUNED: set[tuple] = set()  # (kernel, *_decode_key) whose chain has run eagerly (so is tuned)


def _chain_now(kind: str, x2: torch.Tensor, qw: QuantizedWeight, bias) -> bool:
    """The multi-launch decode chains (x rearranged, then the GEMV or the MMA kernel, then maybe a split-K
    reduction) serve under CUDA graph capture, and once per shape and M bucket eagerly: that first call tunes
    them (tuning.py: the whole chain timed per config, kept on disk), as the warm-up before a capture must
    (timing cannot run inside one). Other eager calls take the one-launch matmul: the chain's extra launches
    cost more host time than its GPU time saves."""
    if not x2.is_cuda:
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    key = (kind, *_decode_key(x2, qw, bias))
    if key in _CHAIN_TUNED:
        return False
    _CHAIN_TUNED.add(key)
    return True


def dequant_linear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                          config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """The Triton path. path: auto (by M), gemv (the per-row decode kernel, autotuned or `config`), mma (the
    weight-stationary tensor-core kernel, autotuned or `config`), fused (the matmul kernel, autotuned or
    `config`), dequant (dequantize kernel + cuBLAS). With `config` and path auto: the matmul kernel."""
    check_args(x, qw, bias)
    if path not in PATHS:
        raise ValueError(f"path={path!r}: must be one of {', '.join(PATHS)}")
    n, k = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    if path == "dequant" or (path == "auto" and m >= LARGE_M and config is None):
        w = dequantize_triton(qw, x.dtype)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    elif path == "gemv" or (path == "auto" and m <= GEMV_M and config is None and _chain_now("gemv", x2, qw, bias)):
        y = _launch_gemv(x2, qw, bias, config)
    elif path == "mma" or (path == "auto" and m > GEMV_M and config is None and mma.mma_ok(qw)
                           and _chain_now("mma", x2, qw, bias)):
        if not mma.mma_ok(qw):
            raise ValueError(f"path='mma': qweight.group_size={qw.group_size} holds {qw.group_size * qw.bits // 32} "
                             f"words at bits={qw.bits}; the MMA path needs a multiple of 4")
        y = _launch_mma(x2, qw, bias, config)
    else:
        y = _launch_mm(x2, qw, bias, config)
    return y.reshape(*lead, n)

