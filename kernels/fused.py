"""The fused dequant-matmul kernel (`_dq_mm_kernel`), its autotune space, and the dequantize kernel.

`_dq_mm_kernel` unpacks each [BN, BKW] tile of words in K order in registers (tl.join; each group's (scale, min)
repeated over its words) and multiplies it with a contiguous [BM, BK] slice of x, on the FMA units for few rows
or on tensor cores (dequantized into x's dtype by PTX, through shared memory); the autotuner also tries the
"planes" variant (no unpacking; strided x). Split-K (a third grid axis) keeps every SM streaming when N / BN is
small. It serves eager decode calls, where one launch costs less host time than a chain, and mid M.

`_dequant_kernel` writes the whole weight once, coalesced (the same K-order unpacking), for cuBLAS at large M.
Codes become floats with the 2**23 mantissa trick (an OR and a subtract instead of an int->float convert).
"""
from __future__ import annotations

from ._backend import HAS_TRITON, autotune_kwargs, triton, tl
from ._ptx import _dequant_ptx

SMALL_M = 16  # at or below: the decode tiles (FMA, or 16-row tensor-core tiles); above: the mid-M tiles

if HAS_TRITON:
    from ._common import _row_base, _store_out, _word_offsets

    _DQ4_F16, _DQ4_BF16 = tl.constexpr(_dequant_ptx(4, False)), tl.constexpr(_dequant_ptx(4, True))
    _DQ2_F16, _DQ2_BF16 = tl.constexpr(_dequant_ptx(2, False)), tl.constexpr(_dequant_ptx(2, True))

    @triton.jit
    def _codes_to_float(c):
        # 2**23 + code as a float bit pattern: exact, and cheaper than an int->float convert.
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dequant_words(words, sc, mn, BITS: tl.constexpr):
        """[R, W] int32 words and (scale, min) per word [R, W] or per row [R, 1] -> [R, W * 32 // BITS] fp32 in K
        order. Each tl.join halves the code width and adds a minor dimension of 2 held by the same thread,
        so the scale broadcasts over those dimensions and the final reshape moves no data. (Scales gathered
        per value instead are many times slower: the loads, not the arithmetic, bound them.)"""
        c = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF)  # codes 0..PW/2-1 | PW/2..PW-1
        c = tl.join(c & 0xFF, c >> 8)
        c = tl.join(c & 0xF, c >> 4)
        if BITS == 2:
            c = tl.join(c & 0x3, c >> 2)
            w = _codes_to_float(c) * sc[:, :, None, None, None, None] + mn[:, :, None, None, None, None]
        else:
            w = _codes_to_float(c) * sc[:, :, None, None, None] + mn[:, :, None, None, None]
        return tl.reshape(w, (words.shape[0], words.shape[1] * (32 // BITS)))

    @triton.jit
    def _join8(c0, c1, c2, c3, c4, c5, c6, c7):
        return tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))

    @triton.jit
    def _dequant_pairs(words, sc, mn, BITS: tl.constexpr, BF16: tl.constexpr):
        """[R, W] int32 words and fp16 (scale, min) per word [R, W] or per row [R, 1] -> [R, W * PW] in K order,
        bf16 or fp16, by PTX (_dequant_ptx): ~1.5 instructions a code (bf16: ~3) where _dequant_words' fp32
        takes ~5 and a convert."""
        out = tl.bfloat16 if BF16 else tl.float16
        if BITS == 4:
            ptx: tl.constexpr = _DQ4_BF16 if BF16 else _DQ4_F16
            c = tl.inline_asm_elementwise(ptx, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [words, sc, mn],
                                          dtype=(out,) * 8, is_pure=True, pack=1)
            w = _join8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7])
        else:
            ptx: tl.constexpr = _DQ2_BF16 if BF16 else _DQ2_F16
            c = tl.inline_asm_elementwise(ptx, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                                          [words, sc, mn], dtype=(out,) * 16, is_pure=True, pack=1)
            w = tl.join(_join8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]),
                        _join8(c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]))
        return tl.reshape(w, (words.shape[0], words.shape[1] * (32 // BITS)))

    @triton.jit
    def _group_params(s_ptr, m_ptr, rn64, n_ok, N, g0, g_hi, GT: tl.constexpr):
        """(scale, min) [R, GT] of groups g0 .. g0 + GT - 1 of rows rn64 [R], zeros from group g_hi on."""
        g = g0 + tl.arange(0, GT)[None, :]
        mask = n_ok[:, None] & (g < g_hi)
        off = g * N + rn64[:, None]
        return tl.load(s_ptr + off, mask=mask, other=0.0), tl.load(m_ptr + off, mask=mask, other=0.0)

    @triton.jit
    def _dq_mm_kernel(x_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, p_ptr, M, N, K, M_BUCKET, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr,
                      USE_DOT: tl.constexpr, PLANES: tl.constexpr = False, ASM: tl.constexpr = False,
                      ADD: tl.constexpr = False):
        """y = x @ dequant(w).T (+ bias) [M, N] (contiguous); with SPLIT_K > 1 each K range writes fp32
        partials p[pid_k] [M, N] instead, which _splitk_reduce_kernel sums into y, or (ADD) adds its partial
        into y, zeroed by the caller (_store_out).

        Per tile of [BN, BKW] words: one (scale, min) per row and group (the tile's group, or its whole
        groups repeated over their words in registers), loaded a tile ahead; the words unpacked in K order
        to [BN, BK] and x read contiguously [BM, BK]. Tensor cores (USE_DOT; with ASM the words become x's
        dtype by PTX, _dequant_pairs, else fp32 by _dequant_words) or, for few rows, the FMA units into a
        [BM, BN, BK] accumulator reduced once after the loop (none inside it). PLANES (FMA only): no
        unpacking shuffles; plane j of the words meets the strided columns kw * PW + j of x (L1-resident),
        into a [BM, BN, BKW] accumulator. The autotuner picks among all of these."""
        PW: tl.constexpr = 32 // BITS  # codes per int32 word
        BK: tl.constexpr = BKW * PW
        # Tiles start at multiples of BK (split ranges are whole tiles) and BK, GROUP are powers of two.
        ROW_SCALE: tl.constexpr = BK <= GROUP
        GT: tl.constexpr = 1 if ROW_SCALE else BK // GROUP  # groups per tile
        KW = K // PW
        NG = K // GROUP
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rw = tl.arange(0, BKW)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < M, rn < N
        rn64 = rn.to(tl.int64)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        WPG: tl.constexpr = GROUP // PW
        w_rows = w_ptr + _row_base(rn64, NG, WPG)[:, None]

        # This split's word range, whole BKW tiles.
        per_split = tl.cdiv(tl.cdiv(KW, SPLIT_K), BKW) * BKW
        kw_lo = pid_k * per_split
        kw_hi = tl.minimum(kw_lo + per_split, KW)

        if USE_DOT:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        elif PLANES:
            acc3 = tl.zeros((BM, BN, BKW), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BM, BN, BK), dtype=tl.float32)
        # (scale, min) [BN, GT] loaded one tile ahead: too small for Triton's cp.async pipelining, a plain
        # load puts a DRAM round trip on every iteration
        g_hi = tl.cdiv(kw_hi * PW, GROUP)  # past this split's groups (a tile may share its last group)
        sc_next, mn_next = _group_params(s_ptr, m_ptr, rn64, n_ok, N, (kw_lo * PW) // GROUP, g_hi, GT)
        for kw0 in range(kw_lo, kw_hi, BKW):
            kw = kw0 + rw
            k_ok = kw < kw_hi
            wmask = n_ok[:, None] & k_ok[None, :]
            words = tl.load(w_rows + _word_offsets(kw, WPG)[None, :], mask=wmask, other=0)
            sc, mn = sc_next, mn_next
            sc_next, mn_next = _group_params(s_ptr, m_ptr, rn64, n_ok, N, ((kw0 + BKW) * PW) // GROUP, g_hi, GT)
            if not ROW_SCALE:  # whole groups: each group's (scale, min) repeated over its words in registers
                sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, GT, BKW // GT)), (BN, BKW))
                mn = tl.reshape(tl.broadcast_to(mn[:, :, None], (BN, GT, BKW // GT)), (BN, BKW))
            if PLANES:  # plane j = code j of every word, times the strided columns kw * PW + j of x
                xmask = m_ok[:, None] & k_ok[None, :]
                sc, mn = sc.to(tl.float32), mn.to(tl.float32)
                for j in tl.static_range(PW):
                    wj = _codes_to_float((words >> (j * BITS)) & ((1 << BITS) - 1)) * sc + mn  # [BN, BKW]
                    xj = tl.load(x_rows + (kw * PW + j)[None, :], mask=xmask, other=0.0).to(tl.float32)
                    acc3 += xj[:, None, :] * wj[None, :, :]
            else:
                kk = kw0 * PW + rk
                xk = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < kw_hi * PW)[None, :], other=0.0)
                if USE_DOT and ASM:  # dequantized by PTX straight into x's dtype, [BN, BK]
                    w = _dequant_pairs(words, sc.to(tl.float16), mn.to(tl.float16), BITS, xk.dtype == tl.bfloat16)
                    acc = tl.dot(xk, tl.trans(w), acc)
                else:
                    w = _dequant_words(words, sc.to(tl.float32), mn.to(tl.float32), BITS)  # [BN, BK] fp32
                    if not USE_DOT:
                        acc3 += xk.to(tl.float32)[:, None, :] * w[None, :, :]
                    elif DOT_F32:  # Triton's interpreter multiplies bf16 bit patterns as integers
                        acc = tl.dot(xk.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xk, tl.trans(w.to(xk.dtype)), acc)
        if not USE_DOT:
            acc = tl.sum(acc3, axis=2)

        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # once, not once per split
        _store_out(acc, y_ptr, p_ptr, rm.to(tl.int64)[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                   pid_k, M, N, SPLIT_K, ADD)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
        """out [N, K] = dequant(w) in out's dtype: words unpacked in K order (_dequant_words), so every
        thread writes its word's PW values contiguously."""
        PW: tl.constexpr = 32 // BITS
        KW = K // PW
        NG = K // GROUP
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        kw = tl.program_id(1) * BKW + tl.arange(0, BKW)
        rk = tl.program_id(1) * BKW * PW + tl.arange(0, BKW * PW)
        rn64 = rn.to(tl.int64)
        wmask = (rn < N)[:, None] & (kw < KW)[None, :]
        words = tl.load(w_ptr + _row_base(rn64, NG, GROUP // PW)[:, None] + _word_offsets(kw, GROUP // PW)[None, :],
                        mask=wmask, other=0)
        soff = ((kw * PW) // GROUP)[None, :] * N + rn64[:, None]
        sc = tl.load(s_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
        w = _dequant_words(words, sc, mn, BITS)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        tl.store(out_ptr + rn64[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

    def _cfg(bm, bn, bkw, split, dot, warps, stages=3, planes=False):
        meta = {"BM": bm, "BN": bn, "BKW": bkw, "SPLIT_K": split, "USE_DOT": dot, "PLANES": planes}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    # Decode: BM is the M bucket (1, 2, 4, 8, 16) on the FMA path, 16 on the tensor-core path.
    DECODE_CONFIGS = [
        *(_cfg(bm, bn, bkw, split, False, warps)
          for bm in (1, 2, 4, 8, 16)
          for bn, bkw, split, warps in ((16, 16, 1, 4), (32, 16, 1, 4), (16, 32, 1, 4), (16, 32, 4, 4),
                                        (32, 32, 2, 8), (8, 32, 8, 4))),
        *(_cfg(bm, bn, bkw, split, False, warps, planes=True)  # FMA by planes: no unpacking shuffles
          for bm in (1, 2, 4)
          for bn, bkw, split, warps in ((16, 64, 1, 4), (32, 64, 1, 4), (16, 128, 4, 4), (8, 128, 8, 4))),
        *(_cfg(16, bn, bkw, split, True, warps, stages)
          for bn, bkw, split, warps, stages in ((32, 16, 1, 4, 3), (64, 16, 1, 4, 3), (64, 8, 4, 4, 4),
                                                (128, 16, 1, 8, 3), (64, 8, 2, 4, 3), (64, 16, 4, 4, 3),
                                                (64, 16, 8, 4, 3), (64, 32, 2, 4, 3))),
    ]
    MID_CONFIGS = [
        _cfg(bm, bn, bkw, 1, True, warps, stages)
        for bm, bn, bkw, warps, stages in ((64, 64, 16, 4, 3), (64, 128, 16, 8, 3), (128, 128, 8, 8, 3),
                                           (128, 64, 16, 8, 3), (32, 128, 16, 4, 4))
    ]
    MAX_DOT_BK = 256  # codes per K tile on tensor cores (BKW x 32 / BITS), to bound the unpacked tile

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        mb, pw = args["M_BUCKET"], 32 // args["BITS"]
        out = []
        for c in configs:
            kw = c.kwargs
            if kw["USE_DOT"]:
                if (mb > SMALL_M) != (kw["BM"] > 16) or kw["BKW"] * pw > MAX_DOT_BK:
                    continue  # decode tiles for decode, mid tiles above
            elif (mb > SMALL_M or kw["BM"] != mb
                  or kw["BM"] * kw["BN"] * kw["BKW"] * (1 if kw["PLANES"] else pw) > 64 * 32 * c.num_warps):
                continue  # FMA: BM = the M bucket, the accumulator within ~64 registers a thread
            out.append(c)
        return out or configs

    _dq_mm_tuned = triton.autotune(
        configs=DECODE_CONFIGS + MID_CONFIGS,
        key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
        **autotune_kwargs(),
    )(_dq_mm_kernel)
