"""Fused group-wise 4/2-bit dequantize + linear: y = x @ dequant(qw).T (+ bias), one launch.

Weight format (ttha.quant): codes packed along K in int32 words, code j of a word in bits
[bits*j, bits*(j+1)), one fp16 (scale, min) per group of `group_size` values along K.

The kernel loads a [BN, BK/PW] tile of words, unpacks it in registers to [BN, BK] codes,
turns codes into floats with the 2**23 mantissa trick (an OR and a subtract instead of a slow
int->float convert), applies scale and min with one FMA, and feeds tensor cores (tl.dot) in
the activation dtype. Two regimes, picked from M: few rows (M <= 16) use BM = 16 and narrow N
tiles so that N / BN programs stream the weight over the whole GPU (the split-K equivalent for
these shapes: each program streams a thin full-K slab, so no partial sums or second launch);
many rows use large square-ish tiles with grouped ordering for L2 reuse.
"""
from __future__ import annotations

import torch

from ttha.quant import QuantizedWeight, dequantize

from ._backend import HAS_TRITON, autotune_kwargs, interpreting, triton, tl

SMALL_M = 16  # at or below: the GEMV-like regime


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
    def _dq_linear_kernel(x_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                          stride_xm, stride_ym,
                          BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        PW: tl.constexpr = 32 // BITS  # codes per int32 word
        BKW: tl.constexpr = BK // PW  # words per row of a K tile
        MASK: tl.constexpr = (1 << BITS) - 1
        KW = K // PW
        NG = K // GROUP

        # Grouped ordering: consecutive programs share x rows and weight columns in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rw = tl.arange(0, BKW)
        shifts = tl.arange(0, PW) * BITS
        m_ok = rm < M
        n_ok = rn < N
        rn64 = rn.to(tl.int64)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                        mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            kw = k0 // PW + rw
            wmask = n_ok[:, None] & (kw[None, :] < KW)
            words = tl.load(w_ptr + rn64[:, None] * KW + kw[None, :], mask=wmask, other=0)
            # Group of each word (a word never straddles groups: GROUP is a multiple of PW).
            g = (kw * PW) // GROUP
            sm_off = rn64[:, None] * NG + g[None, :]
            sc = tl.load(s_ptr + sm_off, mask=wmask, other=0.0).to(tl.float32)
            mn = tl.load(m_ptr + sm_off, mask=wmask, other=0.0).to(tl.float32)
            codes = (words[:, :, None] >> shifts[None, None, :]) & MASK
            # 2**23 + code as a float bit pattern: exact, and cheaper than an int->float convert.
            f = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = f * sc[:, :, None] + mn[:, :, None]
            w = tl.reshape(w, (BN, BK))
            if DOT_F32:  # Triton's interpreter multiplies bf16 bit patterns as integers
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)

        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _cfg(bm, bn, bk, warps, stages, gm=8):
        return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": gm}, num_warps=warps, num_stages=stages)

    SMALL_CONFIGS = [
        _cfg(16, 16, 256, 4, 4), _cfg(16, 32, 256, 4, 4), _cfg(16, 64, 256, 4, 3),
        _cfg(16, 32, 512, 4, 3), _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 8, 3),
        _cfg(16, 16, 512, 4, 3), _cfg(16, 64, 512, 8, 3),
    ]
    LARGE_CONFIGS = [
        _cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4),
        _cfg(128, 128, 128, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(64, 256, 64, 8, 4),
    ]

    def _prune(configs, named_args, **kwargs):
        small = named_args["M_BUCKET"] <= SMALL_M
        return [c for c in configs if (c.kwargs["BM"] == 16) == small] or configs

    _dq_linear_tuned = triton.autotune(
        configs=SMALL_CONFIGS + LARGE_CONFIGS,
        key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_BIAS", "DOT_F32"],
        prune_configs_by={"early_config_prune": _prune},
        **autotune_kwargs(),
    )(_dq_linear_kernel)


def _m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a new batch size reuses a tuned config."""
    return 1 << max(0, (m - 1).bit_length())


def dequant_linear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                          config: dict | None = None) -> torch.Tensor:
    """Launch the fused kernel (autotuned on GPU; `config` or a small fixed one under the interpreter)."""
    check_args(x, qw, bias)
    n, k = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    args = (x2, qw.packed, qw.scales, qw.mins, bias if bias is not None else y, y, m, n, k, _m_bucket(m),
            x2.stride(0), y.stride(0))
    meta = dict(BITS=qw.bits, GROUP=qw.group_size, HAS_BIAS=bias is not None, DOT_F32=interpreting())
    if config is None and interpreting():
        config = {"BM": 16, "BN": 16, "BK": 128, "GROUP_M": 4}
    if config is not None:
        grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
        _dq_linear_kernel[grid](*args, **meta, **config)
    else:
        grid = lambda c: (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]),)  # noqa: E731
        _dq_linear_tuned[grid](*args, **meta)
    return y.reshape(*lead, n)
