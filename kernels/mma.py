"""The weight-stationary tensor-core decode kernel (`_mma_kernel`, GEMV_M < M < LARGE_M): `_x_mma_kernel`
rearranges x into the order in which an MMA's A operand holds a thread's unpacked words, then `_mma_kernel`
feeds the codes from registers straight into the MMA, exact in x's dtype, and applies each group's scale and
min to the [BN, BM] sums in fp32; and its autotune space.

Not for 2-bit weights in groups of 32 (2 words a group; the MMA order needs blocks of 4): `mma_ok`.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, autotune_kwargs, triton, tl
from ._ptx import _codes_ptx
from .quant import QuantizedWeight


def mma_ok(qw: QuantizedWeight) -> bool:
    """_mma_kernel takes the weight: whole 4-word blocks a group (all but 2-bit with groups of 32)."""
    return (qw.group_size * qw.bits // 32) % 4 == 0


def mma_order(bits: int, k: int) -> torch.Tensor:
    """Column k of x -> its place in the MMA order of _x_mma_kernel (the torch statement of it, for tests):
    code c of word kw sits at 4 PW (kw // 4) + 8 (c % PP) + 2 (kw % 4) + c // PP."""
    pw = 32 // bits
    kk = torch.arange(k)
    kw, c = kk // pw, kk % pw
    return 4 * pw * (kw // 4) + 8 * (c % (pw // 2)) + 2 * (kw % 4) + c // (pw // 2)


if HAS_TRITON:
    from ._common import _TILE, _fill_sms, _row_base, _store_out, _zero_row_share, gdc_launch_dependents, gdc_wait

    _C4_F16, _C4_BF16 = tl.constexpr(_codes_ptx(4, False)), tl.constexpr(_codes_ptx(4, True))
    _C2_F16, _C2_BF16 = tl.constexpr(_codes_ptx(2, False)), tl.constexpr(_codes_ptx(2, True))

    @triton.jit
    def _mma_magic(BF16: tl.constexpr):
        """The value of MMA_MAGIC (_ptx.py; fp16 1024, bf16 128): magic + code is what _mma_codes gives."""
        if BF16:
            return 128.0
        else:
            return 1024.0

    @triton.jit
    def _mma_codes(words, BITS: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
        """[R, W] int32 words (W a multiple of 4) -> [R, W * PW] magic + code in x's dtype, in the MMA order
        (mma_order): code c of word kw at 4 PW (kw // 4) + 8 (c % PP) + 2 (kw % 4) + c // PP. That is the order
        in which the A operand of a tensor-core MMA (m16n8k16 / wgmma, 16-bit) holds values a thread unpacked
        from its own word: each 32-bit register is one pair (both halves of one word), a thread's registers of
        a row are 8 apart along K, and 4 threads share a k16 block. So the tile reaches the tensor cores from
        registers, with no shared-memory round trip (the M = 16 limit of _dq_mm_kernel) and no shuffles: the
        joins, the permute and the reshapes below only rename registers."""
        R: tl.constexpr = words.shape[0]
        W: tl.constexpr = words.shape[1]
        dt = tl.bfloat16 if BF16 else tl.float16
        PP: tl.constexpr = 16 // BITS
        if ASM:
            if BITS == 4:
                ptx: tl.constexpr = _C4_BF16 if BF16 else _C4_F16
                c = tl.inline_asm_elementwise(ptx, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(dt,) * 8,
                                              is_pure=True, pack=1)
            else:
                ptx: tl.constexpr = _C2_BF16 if BF16 else _C2_F16
                c = tl.inline_asm_elementwise(ptx, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r", [words],
                                              dtype=(dt,) * 16, is_pure=True, pack=1)
        else:  # the same values by Triton ops (the interpreter cannot run PTX)
            m: tl.constexpr = (1 << BITS) - 1
            c = ()
            for p in tl.static_range(PP):
                c = c + ((((words >> (BITS * p)) & m).to(tl.float32) + _mma_magic(BF16)).to(dt),
                         (((words >> (16 + BITS * p)) & m).to(tl.float32) + _mma_magic(BF16)).to(dt))
        p0, p1, p2, p3 = tl.join(c[0], c[1]), tl.join(c[2], c[3]), tl.join(c[4], c[5]), tl.join(c[6], c[7])
        v = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # [R, W, h, j0, j1]: code j + 4 h, j = j0 + 2 j1
        if BITS == 4:
            v = tl.permute(tl.reshape(v, (R, W // 4, 4, 2, 2, 2)), (0, 1, 5, 4, 2, 3))  # [R, q, j1, j0, t, h]
        else:
            p4, p5, p6, p7 = tl.join(c[8], c[9]), tl.join(c[10], c[11]), tl.join(c[12], c[13]), tl.join(c[14], c[15])
            v = tl.join(v, tl.join(tl.join(p4, p5), tl.join(p6, p7)))  # [R, W, h, j0, j1, j2]
            v = tl.permute(tl.reshape(v, (R, W // 4, 4, 2, 2, 2, 2)), (0, 1, 6, 5, 4, 2, 3))
        return tl.reshape(v, (R, W * (32 // BITS)))

    @triton.jit
    def _x_mma_kernel(x_ptr, xv_ptr, xs_ptr, y_ptr, M, KW, NG, N, stride_xm, BITS: tl.constexpr,
                      GROUP: tl.constexpr, BKW: tl.constexpr, PDL: tl.constexpr = False, ZERO: tl.constexpr = False):
        """x [M, K] -> for _mma_kernel: xv [M, K] (x's dtype) in the MMA order of _mma_codes, and xs [NG, M]
        fp32, each group's sum of x (for the mins, and the magic the codes carry). BKW words of a row per program,
        whole groups. PDL: the matmul may launch at once. ZERO: y [M, N] zeroed, for split-K adds."""
        if PDL:
            gdc_launch_dependents()
        if ZERO:
            _zero_row_share(y_ptr, N)
        PW: tl.constexpr = 32 // BITS
        PP: tl.constexpr = PW // 2
        m = tl.program_id(1)
        kw = tl.program_id(0) * BKW + tl.arange(0, BKW)
        c = tl.arange(0, PW)
        ok = (kw < KW)[:, None]
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + (kw * PW)[:, None] + c[None, :], mask=ok, other=0.0)
        vk = 4 * PW * (kw // 4)[:, None] + 8 * (c % PP)[None, :] + 2 * (kw % 4)[:, None] + (c // PP)[None, :]
        tl.store(xv_ptr + m.to(tl.int64) * (KW * PW) + vk, x, mask=ok)
        NGC: tl.constexpr = BKW * PW // GROUP
        gs = tl.sum(tl.reshape(tl.sum(x.to(tl.float32), axis=1), (NGC, GROUP // PW)), axis=1)
        g = tl.program_id(0) * NGC + tl.arange(0, NGC)
        tl.store(xs_ptr + g * M + m, gs, mask=g < NG)

    @triton.jit
    def _mma_group_params(s_ptr, m_ptr, xs_ptr, rn64, n_ok, rm, m_ok, g, M, N):
        """Group g's scale and min of rows rn64 [BN] and x sums of rows rm [BM]."""
        return (tl.load(s_ptr + g * N + rn64, mask=n_ok, other=0.0),
                tl.load(m_ptr + g * N + rn64, mask=n_ok, other=0.0),
                tl.load(xs_ptr + g * M + rm, mask=m_ok, other=0.0))

    @triton.jit
    def _mma_kernel(xv_ptr, xs_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, p_ptr, M, N, K, M_BUCKET,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                    DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    SPLIT_K: tl.constexpr, PDL: tl.constexpr = False, ADD: tl.constexpr = False):
        """y = x @ dequant(w).T (+ bias) [M, N], weight-stationary ("swap AB"): per group, the [BN, GROUP] codes
        of BN weight rows (the MMA's M side, 64 a warpgroup, from registers: _mma_codes) times x's [GROUP, BM]
        (the N side, from shared memory, xv from _x_mma_kernel), on tensor cores, exact (magic + code in x's
        dtype, fp32 accumulation). Then in fp32 per group: acc += scale * d + (min - magic * scale) * sum(x):
        the scale, min and magic applied to [BN, BM] sums instead of to every code, so the loop costs well under
        half the instructions a code of _dq_mm_kernel's. With SPLIT_K > 1 each range of groups adds its partial
        into y (ADD) or writes it to p[pid_k] (_store_out). PDL: launched while _x_mma_kernel runs, so wait for
        xv."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        PW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PW
        BF16: tl.constexpr = xv_ptr.dtype.element_ty == tl.bfloat16
        NG = K // GROUP
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        n_ok, m_ok = rn < N, rm < M
        rn64 = rn.to(tl.int64)
        w_rows = w_ptr + _row_base(rn64, NG, WPG)[:, None] + tl.arange(0, WPG)[None, :]  # group 0
        x_cols = xv_ptr + rm.to(tl.int64)[None, :] * K + tl.arange(0, GROUP)[:, None]
        per_split = NG // SPLIT_K  # whole (the host's configs ensure it)
        g_lo = pid_k * per_split
        g_hi = g_lo + per_split
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        # the group's (scale, min) and x sums, loaded a group ahead (too small for Triton's cp.async pipelining:
        # plain loads would put a memory round trip on every group)
        sc_n, mn_n, xs_n = _mma_group_params(s_ptr, m_ptr, xs_ptr, rn64, n_ok, rm, m_ok, g_lo, M, N)
        for g in range(g_lo, g_hi):
            words = tl.load(w_rows + g * (_TILE * WPG), mask=n_ok[:, None], other=0)  # one contiguous block
            xt = tl.load(x_cols + g * GROUP, mask=m_ok[None, :], other=0.0)
            sc, mn, xs = sc_n, mn_n, xs_n
            # the last group loads itself again (no mask to compute)
            sc_n, mn_n, xs_n = _mma_group_params(s_ptr, m_ptr, xs_ptr, rn64, n_ok, rm, m_ok,
                                                 tl.minimum(g + 1, g_hi - 1), M, N)
            a = _mma_codes(words, BITS, BF16, ASM)
            if DOT_F32:  # Triton's interpreter multiplies bf16 bit patterns as integers
                d = tl.dot(a.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                d = tl.dot(a, xt)
            sc = sc.to(tl.float32)
            acc = tl.fma(d, sc[:, None], acc)
            acc = tl.fma((mn.to(tl.float32) - _mma_magic(BF16) * sc)[:, None], xs[None, :], acc)
        if HAS_BIAS:
            acc += tl.where(pid_k == 0, tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32), 0.0)[:, None]
        _store_out(acc, y_ptr, p_ptr, rm.to(tl.int64)[None, :] * N + rn[:, None], m_ok[None, :] & n_ok[:, None],
                   pid_k, M, N, SPLIT_K, ADD)

    # Weight-stationary tensor-core decode (_mma_kernel): BM the M bucket (16 at least: the MMA's N side)
    # BN = 256 a warpgroup: x is read once for more rows
    MMA_CONFIGS = [triton.Config({"BN": bn, "SPLIT_K": split}, num_warps=warps, num_stages=stages)
                   for bn, warps in ((64, 4), (128, 8), (128, 4), (256, 4), (256, 8)) for split in (1, 2, 4, 8)
                   for stages in (3, 4)]
    MMA_MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in MMA_CONFIGS)

    def _prune_mma(configs, named_args, **kwargs):
        """Whole groups a split; 1 to MAX_PER_SM programs per SM where the shape allows, else the most."""
        args = {**named_args, **kwargs}
        ng, n = args["K"] // args["GROUP"], args["N"]
        fits = [c for c in configs if ng % c.kwargs["SPLIT_K"] == 0]
        return _fill_sms(fits, n)

    _mma_tuned = triton.autotune(
        configs=MMA_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_mma}, **autotune_kwargs(),
    )(_mma_kernel)
