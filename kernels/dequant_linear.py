"""Group-wise 4/2-bit dequantize + linear: y = x @ dequant(qw).T (+ bias).

Weight format (ttha.quant): codes packed along K in int32 words, code j of a word in bits
[bits*j, bits*(j+1)), one fp16 (scale, min) per group of `group_size` values along K.

Three regimes, picked from M (rows of x):

- M <= SMALL_M (decode, GEMV-like): `_dq_mm_kernel`. Memory bound: the point is to stream the packed
  weight once at full bandwidth. No layout shuffles: a [BN, BKW] tile of words is split into its PW
  "planes" (code j of every word, a shift and a mask), each plane dequantized with one FMA and
  multiplied with the matching strided columns of x (x is tiny and stays in L1). Small M reduces on
  the FMA units; the autotuner may also pick the tensor-core variant. Split-K (a third grid axis,
  partial sums reduced by a second small kernel) keeps every SM streaming when N / BN is small.
- SMALL_M < M < LARGE_M: the same kernel on tensor cores (tl.dot per plane), larger tiles.
- M >= LARGE_M (compute bound): `_dequant_kernel` writes the bf16/fp16 weight once (coalesced: the
  planes are re-interleaved in registers with tl.join), then cuBLAS multiplies. Dequantizing costs one
  pass over N x K (~5 % of the GEMM at M = 4096), cheaper than a Triton GEMM that dequantizes in its
  main loop runs behind cuBLAS on Hopper.

Codes become floats with the 2**23 mantissa trick (an OR and a subtract instead of an int->float
convert). The torch reference is `dequant_linear_ref`.
"""
from __future__ import annotations

import torch

from ttha.quant import QuantizedWeight, dequantize

from ._backend import HAS_TRITON, autotune_kwargs, interpreting, triton, tl

SMALL_M = 16    # at or below: decode regime (GEMV-like)
LARGE_M = 1024  # at or above: dequantize once, then cuBLAS
MAX_SPLIT_K = 8  # largest split in the tuned configs (sizes the partial-sum buffer)


def dequant_linear_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: dequantize to x's dtype, then F.linear."""
    w = dequantize(qw, torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_args(x, qw, bias) -> None:
    """ValueError naming the argument for anything the kernel and the reference cannot take."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qweight: expected a ttha.quant.QuantizedWeight, got {type(qw).__name__}")
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
    if tuple(qw.packed.shape) != (n, k * qw.bits // 32) or qw.packed.dtype != torch.int32:
        raise ValueError(f"qweight.packed: expected int32 {(n, k * qw.bits // 32)}, got "
                         f"{qw.packed.dtype} {tuple(qw.packed.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, x on {x.device}")


if HAS_TRITON:

    @triton.jit
    def _codes_to_float(c):
        # 2**23 + code as a float bit pattern: exact, and cheaper than an int->float convert.
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dq_mm_kernel(x_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, p_ptr, M, N, K, M_BUCKET, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr,
                      USE_DOT: tl.constexpr):
        """y = x @ dequant(w).T (+ bias) [M, N] (contiguous); with SPLIT_K > 1 each K range writes fp32
        partials p[pid_k] [M, N] instead, which _splitk_reduce_kernel sums into y."""
        PW: tl.constexpr = 32 // BITS  # codes per int32 word
        MASK: tl.constexpr = (1 << BITS) - 1
        KW = K // PW
        NG = K // GROUP
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rw = tl.arange(0, BKW)
        m_ok, n_ok = rm < M, rn < N
        rn64 = rn.to(tl.int64)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm

        # This split's word range, whole BKW tiles.
        per_split = tl.cdiv(tl.cdiv(KW, SPLIT_K), BKW) * BKW
        kw_lo = pid_k * per_split
        kw_hi = tl.minimum(kw_lo + per_split, KW)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kw0 in range(kw_lo, kw_hi, BKW):
            kw = kw0 + rw
            k_ok = kw < kw_hi
            wmask = n_ok[:, None] & k_ok[None, :]
            words = tl.load(w_ptr + rn64[:, None] * KW + kw[None, :], mask=wmask, other=0)
            # A word never straddles groups (GROUP is a multiple of PW): one (scale, min) per word.
            soff = rn64[:, None] * NG + ((kw * PW) // GROUP)[None, :]
            sc = tl.load(s_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
            mn = tl.load(m_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
            xmask = m_ok[:, None] & k_ok[None, :]
            for j in tl.static_range(PW):  # plane j: code j of every word = K columns kw * PW + j
                w = _codes_to_float((words >> (j * BITS)) & MASK) * sc + mn  # [BN, BKW]
                xj = tl.load(x_rows + (kw * PW + j)[None, :], mask=xmask, other=0.0)  # [BM, BKW]
                if USE_DOT:
                    if DOT_F32:  # Triton's interpreter multiplies bf16 bit patterns as integers
                        acc = tl.dot(xj.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xj, tl.trans(w.to(xj.dtype)), acc)
                else:
                    acc += tl.sum(xj.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # once, not once per split
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        omask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(p_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=omask)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, y_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """y = sum over the SPLIT_K fp32 partial outputs, cast to y's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(p_ptr + s * numel + offs, mask=ok, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
        """out [N, K] = dequant(w) in out's dtype. The planes are re-interleaved with tl.join (halving
        the code width each level), so each thread writes its word's PW values contiguously."""
        PW: tl.constexpr = 32 // BITS
        KW = K // PW
        NG = K // GROUP
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        kw = tl.program_id(1) * BKW + tl.arange(0, BKW)
        mask = (rn < N)[:, None] & (kw < KW)[None, :]
        rn64 = rn.to(tl.int64)
        words = tl.load(w_ptr + rn64[:, None] * KW + kw[None, :], mask=mask, other=0)
        soff = rn64[:, None] * NG + ((kw * PW) // GROUP)[None, :]
        sc = tl.load(s_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        c = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF)  # [BN, BKW, 2]: codes 0..PW/2-1, PW/2..PW-1
        c = tl.join(c & 0xFF, c >> 8)                          # [..., 2, 2]
        if BITS == 4:
            c = tl.join(c & 0xF, c >> 4)                        # [..., 2, 2, 2]: single 4-bit codes
            w = _codes_to_float(c) * sc[:, :, None, None, None] + mn[:, :, None, None, None]
        else:
            c = tl.join(c & 0xF, c >> 4)
            c = tl.join(c & 0x3, c >> 2)                        # [..., 2, 2, 2, 2]: single 2-bit codes
            w = _codes_to_float(c) * sc[:, :, None, None, None, None] + mn[:, :, None, None, None, None]
        w = tl.reshape(w, (BN, BKW * PW))  # row-major: (word, half, quarter, ...) = code order
        rk = tl.program_id(1) * BKW * PW + tl.arange(0, BKW * PW)
        omask = (rn < N)[:, None] & (rk < K)[None, :]
        tl.store(out_ptr + rn64[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=omask)

    def _cfg(bm, bn, bkw, split, dot, warps, stages=3):
        return triton.Config({"BM": bm, "BN": bn, "BKW": bkw, "SPLIT_K": split, "USE_DOT": dot},
                             num_warps=warps, num_stages=stages)

    # Decode: BM is the M bucket (1, 2, 4, 8, 16) on the FMA path, 16 on the tensor-core path.
    DECODE_CONFIGS = [
        *(_cfg(bm, bn, bkw, split, False, warps)
          for bm in (1, 2, 4, 8, 16)
          for bn, bkw, split, warps in ((16, 64, 1, 4), (32, 64, 1, 4), (16, 128, 4, 4), (32, 128, 2, 8),
                                        (8, 128, 8, 4))),
        *(_cfg(16, bn, bkw, split, True, warps, stages)
          for bn, bkw, split, warps, stages in ((32, 32, 1, 4, 3), (64, 32, 1, 4, 3), (64, 16, 4, 4, 4),
                                                (128, 32, 1, 8, 3))),
    ]
    MID_CONFIGS = [
        _cfg(bm, bn, bkw, 1, True, warps, 3)
        for bm, bn, bkw, warps in ((64, 64, 32, 4), (64, 128, 32, 8), (128, 128, 32, 8), (128, 64, 32, 8),
                                   (32, 128, 64, 4))
    ]

    def _prune(configs, named_args, **kwargs):
        mb = named_args["M_BUCKET"]
        if mb > SMALL_M:
            return [c for c in configs if c.kwargs["USE_DOT"] and c.kwargs["BM"] >= 32] or configs
        keep = [c for c in configs if c.kwargs["BM"] == (16 if c.kwargs["USE_DOT"] else mb)]
        # the FMA path holds a [BM, BN, BKW] product: keep it within ~64 registers a thread
        return [c for c in keep if c.kwargs["USE_DOT"]
                or c.kwargs["BM"] * c.kwargs["BN"] * c.kwargs["BKW"] <= 64 * 32 * c.num_warps] or keep

    _dq_mm_tuned = triton.autotune(
        configs=DECODE_CONFIGS + MID_CONFIGS,
        key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
        **autotune_kwargs(),
    )(_dq_mm_kernel)


def _m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a new batch size reuses a tuned config."""
    return 1 << max(0, (m - 1).bit_length())


def _launch_mm(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    """The matmul kernel (autotuned, or `config`), then the split-K reduction when the config splits."""
    m, n, k = x2.shape[0], qw.shape[0], qw.shape[1]
    if config is None and interpreting():  # small fixed tiles: the interpreter is slow
        config = {"BM": min(_m_bucket(m), 16), "BN": 16, "BKW": 16, "SPLIT_K": 2, "USE_DOT": m > 4}
    # partial sums only where a config may split (decode); mid-M configs never do
    max_split = int(config["SPLIT_K"]) if config is not None else (MAX_SPLIT_K if m <= SMALL_M else 1)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    partials = torch.empty((max_split, m, n), dtype=torch.float32, device=x2.device) if max_split > 1 else y
    args = (x2, qw.packed, qw.scales, qw.mins, bias if bias is not None else x2, y, partials, m, n, k,
            _m_bucket(m), x2.stride(0))
    meta = dict(BITS=qw.bits, GROUP=qw.group_size, HAS_BIAS=bias is not None, DOT_F32=interpreting())
    if config is not None:
        grid = (triton.cdiv(n, config["BN"]), triton.cdiv(m, config["BM"]), int(config["SPLIT_K"]))
        _dq_mm_kernel[grid](*args, **meta, **config)
        split = int(config["SPLIT_K"])
    else:
        _dq_mm_tuned[lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(m, c["BM"]), c["SPLIT_K"])](*args, **meta)
        split = int(_dq_mm_tuned.best_config.kwargs["SPLIT_K"])
    if split > 1:
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](partials, y, m * n, SPLIT_K=split, BLOCK=1024)
    return y


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`, one coalesced pass (the large-M path's first step)."""
    n, k = qw.shape
    out = torch.empty((n, k), dtype=dtype, device=qw.packed.device)
    pw = 32 // qw.bits
    bn, bkw = (16, 16) if interpreting() else (32, 64)
    grid = (triton.cdiv(n, bn), triton.cdiv(k // pw, bkw))
    _dequant_kernel[grid](qw.packed, qw.scales, qw.mins, out, n, k, BITS=qw.bits, GROUP=qw.group_size,
                          BN=bn, BKW=bkw, num_warps=4)
    return out


def dequant_linear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                          config: dict | None = None) -> torch.Tensor:
    """The Triton path (autotuned on GPU; `config` fixes the tiles of the matmul kernel)."""
    check_args(x, qw, bias)
    n, k = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    if m >= LARGE_M and config is None:
        w = dequantize_triton(qw, x.dtype)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    else:
        y = _launch_mm(x2, qw, bias, config)
    return y.reshape(*lead, n)
