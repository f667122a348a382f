"""The decode GEMV for one row of x (M <= GEMV_M): `_x_pairs_kernel` rearranges x into fp16 pairs, then
`_gemv_kernel` streams the weight against them, summing code times x in half2 arithmetic by PTX (_ptx.py); and
its autotune space.
"""
from __future__ import annotations

from ._backend import HAS_TRITON, autotune_kwargs, triton, tl
from ._ptx import _word_dot_ptx

if HAS_TRITON:
    from ._common import (_fill_sms, _row_base, _store_out, _word_offsets, _zero_row_share, gdc_launch_dependents,
                          gdc_wait)

    _PTX4 = tl.constexpr(_word_dot_ptx(4))
    _PTX2 = tl.constexpr(_word_dot_ptx(2))

    @triton.jit
    def _pair_shift(p, BITS: tl.constexpr):
        """Right shift of the word that brings pair p's codes (p and p + PW/2, one per 16-bit half) low
        enough for the half2 trick: code * 2**pos must stay below 2**10, one fp16 ulp at 1024."""
        if BITS == 4:
            return 8 * (p // 2)  # codes at bits 0-3, 4-7 of each half (pos 0, 4)
        else:
            return 0 if p < 5 else 10  # pos 0, 2, 4, 6, 8, then 0, 2, 4

    @triton.jit
    def _x_pairs_kernel(x_ptr, xp_ptr, xg_ptr, y_ptr, KW, NG, N, stride_xm, BITS: tl.constexpr,
                        GROUP: tl.constexpr, BKW: tl.constexpr, PDL: tl.constexpr = False, ZERO: tl.constexpr = False):
        """x [M, K] -> for _gemv_kernel: xp [M, PP, KW] int32, pair p of word kw as half2 (x[kw * PW + p],
        x[kw * PW + p + PP]) * 2**15 / amax(group) * 2**-pos_p (pos undone on x; each group scaled to +-2**15 so
        that its products with the subnormal codes of _word_dot_ptx, code * 2**(pos - 24), are 2**-9 code x / amax:
        normal fp16 for x near the amax); xg [M, 2, NG] fp32: each group's sum of x (for the mins) and amax * 2**9
        (to undo the scaling). PDL: the GEMV may launch at once. ZERO: y [M, N] zeroed, for split-K adds."""
        if PDL:
            gdc_launch_dependents()
        if ZERO:
            _zero_row_share(y_ptr, N)
        PW: tl.constexpr = 32 // BITS
        PP: tl.constexpr = PW // 2
        WPG: tl.constexpr = GROUP // PW  # words per group
        NGC: tl.constexpr = BKW // WPG  # groups per program
        m = tl.program_id(1).to(tl.int64)
        kw = tl.program_id(0) * BKW + tl.arange(0, BKW)
        ok = kw < KW
        x_row = x_ptr + m * stride_xm + kw * PW
        x = tl.load(x_row[:, None] + tl.arange(0, PW)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        gmax = tl.max(tl.reshape(tl.max(tl.abs(x), axis=1), (NGC, WPG)), axis=1)
        gsum = tl.sum(tl.reshape(tl.sum(x, axis=1), (NGC, WPG)), axis=1)
        inv = tl.where(gmax > 0, 32768.0 / tl.where(gmax > 0, gmax, 1.0), 0.0)
        inv_w = tl.reshape(tl.broadcast_to(inv[:, None], (NGC, WPG)), (BKW,))
        out = xp_ptr + m * (PP * KW) + kw
        for p in tl.static_range(PP):
            f = inv_w / (1 << (BITS * p - _pair_shift(p, BITS)))
            lo = (tl.load(x_row + p, mask=ok, other=0.0).to(tl.float32) * f).to(tl.float16)
            hi = (tl.load(x_row + p + PP, mask=ok, other=0.0).to(tl.float32) * f).to(tl.float16)
            lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            hi = hi.to(tl.int16, bitcast=True).to(tl.int32) << 16
            tl.store(out + p * KW, lo | hi, mask=ok)
        g = tl.program_id(0) * NGC + tl.arange(0, NGC)
        tl.store(xg_ptr + m * (2 * NG) + g, gsum, mask=g < NG)
        tl.store(xg_ptr + m * (2 * NG) + NG + g, gmax * 512.0, mask=g < NG)

    @triton.jit
    def _word_dot(words, xp_ptr, KW, kw, BITS: tl.constexpr, ASM: tl.constexpr):
        """[R, W] int32 words times x's pairs at words kw [W] -> [R, W] fp32: per word, 2**-24 times the sum over
        its codes of code * x. The PTX (ASM): per pair, (word >> shift) & lane mask in each half is the fp16
        subnormal code * 2**(pos - 24) (one AND), times x's half2 into an fp16x2 accumulator (HFMA2), the two
        halves summed in fp32 at the end: ~1.5 instructions a code where fp32 needs 4 (with a magic number ORed
        in and subtracted, 2). Elsewhere (Triton's interpreter cannot run PTX) the same sum in fp32."""
        PP: tl.constexpr = 16 // BITS
        if ASM:
            x0 = tl.load(xp_ptr + kw)[None, :]
            x1 = tl.load(xp_ptr + KW + kw)[None, :]
            x2 = tl.load(xp_ptr + 2 * KW + kw)[None, :]
            x3 = tl.load(xp_ptr + 3 * KW + kw)[None, :]
            if BITS == 4:
                r = tl.inline_asm_elementwise(_PTX4, "=r,r,r,r,r,r", [words, x0, x1, x2, x3],
                                              dtype=tl.float32, is_pure=True, pack=1)
            else:
                x4 = tl.load(xp_ptr + 4 * KW + kw)[None, :]
                x5 = tl.load(xp_ptr + 5 * KW + kw)[None, :]
                x6 = tl.load(xp_ptr + 6 * KW + kw)[None, :]
                x7 = tl.load(xp_ptr + 7 * KW + kw)[None, :]
                r = tl.inline_asm_elementwise(_PTX2, "=r,r,r,r,r,r,r,r,r,r", [words, x0, x1, x2, x3, x4, x5, x6, x7],
                                              dtype=tl.float32, is_pure=True, pack=1)
        else:
            r = tl.zeros(words.shape, dtype=tl.float32)
            for p in tl.static_range(PP):
                xp = tl.load(xp_ptr + p * KW + kw)[None, :]
                lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                sh = _pair_shift(p, BITS)
                mask = ((1 << BITS) - 1) << (BITS * p - sh)
                r += ((words >> sh) & mask).to(tl.float32) * lo + ((words >> (sh + 16)) & mask).to(tl.float32) * hi
            r *= 5.9604644775390625e-08  # 2**-24, as the subnormal codes carry it
        return r

    @triton.jit
    def _gemv_loads(w_rows, s_rows, m_rows, n_ok, N, kw0, BITS: tl.constexpr, GROUP: tl.constexpr,
                    BKW: tl.constexpr):
        """The [BN, BKW] words at word kw0 of rows w_rows (their _row_base) and their groups' (scale, min)
        [BN, GT] (fp16; s_rows, m_rows: group 0 of the rows)."""
        PW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PW
        GT: tl.constexpr = BKW // WPG
        g = (kw0 * PW) // GROUP + tl.arange(0, GT)
        words = tl.load(w_rows + _word_offsets(kw0 + tl.arange(0, BKW), WPG)[None, :], mask=n_ok[:, None], other=0)
        return (words, tl.load(s_rows + g[None, :] * N, mask=n_ok[:, None], other=0.0),
                tl.load(m_rows + g[None, :] * N, mask=n_ok[:, None], other=0.0))

    @triton.jit
    def _gemv_tile(acc, acc_min, words, sc, mn, x_row, g_row, KW, NG, kw0,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BKW: tl.constexpr, ASM: tl.constexpr):
        """One [BN, BKW] tile of words with its groups' fp16 (scale, min) [BN, GT] into the accumulators: acc
        [BN, GT, WPG] takes each word's code-times-x sum times its group's scale, acc_min [BN, GT] each min times
        x's group sum. (Summing each group's words before scaling is faster alone but slower in the chain.)"""
        PW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PW
        GT: tl.constexpr = BKW // WPG
        kw = kw0 + tl.arange(0, BKW)
        g = (kw0 * PW) // GROUP + tl.arange(0, GT)
        sc = sc.to(tl.float32) * tl.load(g_row + NG + g)[None, :]  # undo x's group scaling
        dots = tl.reshape(_word_dot(words, x_row, KW, kw, BITS, ASM), (words.shape[0], GT, WPG))
        acc += dots * sc[:, :, None]
        acc_min += mn.to(tl.float32) * tl.load(g_row + g)[None, :]
        return acc, acc_min

    @triton.jit
    def _gemv_kernel(xp_ptr, xg_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, p_ptr, M, N, KW, NG,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                     BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr = 1,
                     PDL: tl.constexpr = False, ADD: tl.constexpr = False):
        """One row of y = x @ dequant(w).T (+ bias) per pid 1 (decode), from x's pairs (_x_pairs_kernel).

        Each [BN, BKW] tile of words covers whole groups: sum_k x_k (c_k s + m) = s sum_k x_k c_k + m sum_k x_k,
        so per word only the code-times-x sum in half2 arithmetic (_word_dot), times its group's scale (and
        x's group scaling, undone), and per group the min times the group's x sum (_gemv_tile): about half the
        instructions a code of fp32 codes. A tile's rows of one group lie in one stored block (a group of 64 rows,
        contiguous: quant.py), so it streams from DRAM in long pieces. With SPLIT_K > 1 each K range adds its
        partial into y (ADD) or writes it to p[pid_k] (_store_out). PDL: launched while _x_pairs_kernel runs, so
        the first tile (words, scales, mins: nothing _x_pairs_kernel writes) is loaded before waiting for x's
        pairs, then the reduction may launch."""
        PW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PW  # words per group
        GT: tl.constexpr = BKW // WPG  # whole groups per tile
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        x_row = xp_ptr + pid_m.to(tl.int64) * (PW // 2 * KW)
        g_row = xg_ptr + pid_m.to(tl.int64) * (2 * NG)
        w_rows = w_ptr + _row_base(rn64, NG, WPG)[:, None]
        s_rows = s_ptr + rn64[:, None]
        m_rows = m_ptr + rn64[:, None]
        per_split = KW // SPLIT_K  # a multiple of BKW (the host's configs ensure it)
        kw_lo = pid_k * per_split
        words, sc, mn = _gemv_loads(w_rows, s_rows, m_rows, n_ok, N, kw_lo, BITS, GROUP, BKW)  # x not needed yet
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        acc, acc_min = _gemv_tile(tl.zeros((BN, GT, WPG), dtype=tl.float32), tl.zeros((BN, GT), dtype=tl.float32),
                                  words, sc, mn, x_row, g_row, KW, NG, kw_lo, BITS, GROUP, BKW, ASM)
        for kw0 in tl.range(kw_lo + BKW, kw_lo + per_split, BKW, num_stages=NUM_STAGES):
            words, sc, mn = _gemv_loads(w_rows, s_rows, m_rows, n_ok, N, kw0, BITS, GROUP, BKW)
            acc, acc_min = _gemv_tile(acc, acc_min, words, sc, mn, x_row, g_row, KW, NG, kw0, BITS, GROUP, BKW, ASM)
        out = tl.sum(tl.sum(acc, axis=2) + acc_min, axis=1)
        if HAS_BIAS:
            out += tl.where(pid_k == 0, tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32), 0.0)
        _store_out(out, y_ptr, p_ptr, pid_m.to(tl.int64) * N + rn, n_ok, pid_k, M, N, SPLIT_K, ADD)

    # NUM_STAGES (kernel default 1) stays out of the tuned space: pipelining the loads through shared memory
    # gains nothing once tiles are wide, and loading each tile one iteration ahead in registers is slower
    GEMV_CONFIGS = [triton.Config({"BN": bn, "BKW": bkw, "SPLIT_K": split}, num_warps=warps)
                    for bn, warps in ((32, 2), (64, 4), (64, 8), (128, 4), (128, 8)) for bkw in (8, 16, 32, 64, 128)
                    for split in (1, 2, 4, 8, 16)]
    GEMV_MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS)  # sizes the partial-sum buffer

    def _prune_gemv(configs, named_args, **kwargs):
        """Tiles of whole groups, whole tiles per split, 16-32 words a thread (where the best tiles of a full sweep
        lie) and 1 to MAX_PER_SM programs per SM; shapes too small for that get the configs with the most programs."""
        args = {**named_args, **kwargs}
        wpg, kwn, n = args["GROUP"] * args["BITS"] // 32, args["KW"], args["N"]
        fits = [c for c in configs  # whole groups a tile, whole tiles a split
                if c.kwargs["BKW"] % wpg == 0 and kwn % (c.kwargs["SPLIT_K"] * c.kwargs["BKW"]) == 0]
        if not fits:  # K an odd number of small groups (3 x 32, say): one-group tiles always fit
            return [triton.Config({"BN": 32, "BKW": wpg, "SPLIT_K": 1}, num_warps=2)]
        return _fill_sms(fits, n, lambda c: 16 <= c.kwargs["BN"] * c.kwargs["BKW"] // (32 * c.num_warps) <= 32)

    _gemv_tuned = triton.autotune(
        configs=GEMV_CONFIGS, key=["N", "KW", "BITS", "GROUP", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_gemv}, **autotune_kwargs(),
    )(_gemv_kernel)
