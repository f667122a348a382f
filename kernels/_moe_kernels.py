"""The grouped MoE decode kernels that moe.py launches, and their autotune spaces.

One layer's experts are FFNs w2 @ gelu(w1 @ x), stacked per precision (16-bit, 4-bit, 2-bit). A decode step is
four or five launches over the route plan (topk_router.RoutePlan: slots grouped by expert, on the device):

- `_moe_prep_kernel`: x in the MMA order of 4-bit and 2-bit codes and x's group sums (what mma._x_mma_kernel
  writes for one weight), for the quantized experts' up projections.
- `_moe_kernel` (UP): x[token] @ w1.T for every routed slot in fp32 partials per K split, a program per (expert,
  N block, K split); `_moe_up_finish_kernel` sums them into h[slot] = gelu(.). With one split the kernel stores h.
- `_moe_kernel` (down): y[slot] = h[slot] @ w2.T in fp32 partials per K split.
- `_moe_combine_kernel`: out[t] = sum_j weights[t, j] * y[t * k + j].

Why split K in the up projection too: an expert's up projection has only d_ff / BN row blocks, so with one or two
experts routed too few programs run to fill the GPU and each streams its whole K alone; splits multiply them.

A program of `_moe_kernel` reads its expert's slot range from the plan and returns at once when it is empty, so
an unrouted expert's weights are never read, and the host never needs the counts (a CUDA graph captures the
step whatever the routing). Otherwise it reads its weight tile once for all of the expert's tokens. All
precisions share one launch: programs of the quantized experts (bound by unpacking) and of the 16-bit ones (bound
by memory) run side by side on the SMs, where one launch per precision would run them one after the other, each
with its own ramp and tail.
"""
from __future__ import annotations

from ._backend import HAS_TRITON, autotune_kwargs, triton, tl

PRECISION_CODES = {16: 0, 4: 1, 2: 2}  # the expert table's precision codes
COMBINE_BLOCK = 1024

if HAS_TRITON:
    from ._common import _TILE, _row_base
    from .mma import _mma_codes, _mma_group_params, _mma_magic

    @triton.jit
    def _mma_pos(col, BITS: tl.constexpr):
        """Column col of a row -> its place in the MMA order of BITS-bit codes (mma.mma_order): code c of word
        kw at 4 PW (kw // 4) + 8 (c % PP) + 2 (kw % 4) + c // PP, a permutation within blocks of 4 words."""
        PW: tl.constexpr = 32 // BITS
        PP: tl.constexpr = PW // 2
        kw = col // PW
        c = col % PW
        return 4 * PW * (kw // 4) + 8 * (c % PP) + 2 * (kw % 4) + c // PP

    @triton.jit
    def _moe_prep_kernel(x_ptr, xv4_ptr, xv2_ptr, xs_ptr, T, D, stride_x, GROUP: tl.constexpr,
                         HAS4: tl.constexpr, HAS2: tl.constexpr, BLOCK: tl.constexpr):
        """x [T, D] -> xv4, xv2 [T, D]: x in the MMA order of 4-bit and 2-bit codes (the quantized up
        projections' B operand, read in contiguous groups), and xs [D / GROUP, T] fp32, each group's sum of x
        (for the mins and the magic the codes carry). BLOCK columns of one token a program, whole groups."""
        t = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < D
        x = tl.load(x_ptr + t.to(tl.int64) * stride_x + cols, mask=ok, other=0.0)
        row = t.to(tl.int64) * D
        if HAS4:
            tl.store(xv4_ptr + row + _mma_pos(cols, 4), x, mask=ok)
        if HAS2:
            tl.store(xv2_ptr + row + _mma_pos(cols, 2), x, mask=ok)
        NGB: tl.constexpr = BLOCK // GROUP
        g = tl.program_id(0) * NGB + tl.arange(0, NGB)
        sums = tl.sum(tl.reshape(x.to(tl.float32), (NGB, GROUP)), axis=1)
        tl.store(xs_ptr + g * T + t, sums, mask=g < D // GROUP)

    @triton.jit
    def _dense_acc(w_ptr, a_ptr, rn64, n_ok, rows64, m_ok, K, stride_a, k_lo, k_hi,
                   BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
        """[BN, BM] fp32 = rows rn64 of a 16-bit weight [N, K] (w_ptr: this expert's) times rows rows64 of a, over
        columns k_lo .. k_hi (whole BK tiles). Weight-stationary (the weight is the MMA's M side), as in the
        quantized branch, so both share the epilogue."""
        rk = tl.arange(0, BK)
        w_tile = w_ptr + rn64[:, None] * K + rk[None, :]
        a_tile = a_ptr + rows64[None, :] * stride_a + rk[:, None]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            w = tl.load(w_tile + k0, mask=n_ok[:, None], other=0.0)
            a = tl.load(a_tile + k0, mask=m_ok[None, :], other=0.0)
            if DOT_F32:  # Triton's interpreter multiplies bf16 bit patterns as integers
                acc = tl.dot(w.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, a, acc)
        return acc

    @triton.jit
    def _quant_acc(p_ptr, s_ptr, m_ptr, av_ptr, as_ptr, rn64, n_ok, rows64, m_ok, N, K, R, g_lo, g_hi,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                   ASM: tl.constexpr, DOT_F32: tl.constexpr):
        """[BN, BM] fp32 = rows rn64 of a BITS-bit weight (p/s/m_ptr: this expert's stored tiles, scales, mins)
        times rows rows64 of av (in the MMA order of BITS-bit codes; as_ptr: its group sums [K / GROUP, R]), over
        groups g_lo .. g_hi: mma._mma_kernel's loop (codes from registers into the MMA, exact in av's dtype,
        then acc += scale * d + (min - magic * scale) * sum(av) per group), on gathered rows."""
        PW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PW
        BF16: tl.constexpr = av_ptr.dtype.element_ty == tl.bfloat16
        NG = K // GROUP
        w_rows = p_ptr + _row_base(rn64, NG, WPG)[:, None] + tl.arange(0, WPG)[None, :]
        a_cols = av_ptr + rows64[None, :] * K + tl.arange(0, GROUP)[:, None]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        # (scale, min) and the group sums loaded a group ahead, as in _mma_kernel
        sc_n, mn_n, as_n = _mma_group_params(s_ptr, m_ptr, as_ptr, rn64, n_ok, rows64, m_ok, g_lo, R, N)
        for g in range(g_lo, g_hi):
            words = tl.load(w_rows + g * (_TILE * WPG), mask=n_ok[:, None], other=0)  # one contiguous block
            at = tl.load(a_cols + g * GROUP, mask=m_ok[None, :], other=0.0)
            sc, mn, asum = sc_n, mn_n, as_n
            sc_n, mn_n, as_n = _mma_group_params(s_ptr, m_ptr, as_ptr, rn64, n_ok, rows64, m_ok,
                                                 tl.minimum(g + 1, g_hi - 1), R, N)
            codes = _mma_codes(words, BITS, BF16, ASM)
            if DOT_F32:
                d = tl.dot(codes.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:
                d = tl.dot(codes, at)
            sc = sc.to(tl.float32)
            acc = tl.fma(d, sc[:, None], acc)
            acc = tl.fma((mn.to(tl.float32) - _mma_magic(BF16) * sc)[:, None], asum[None, :], acc)
        return acc

    @triton.jit
    def _moe_store(acc, out_ptr, os_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, UP: tl.constexpr,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
        """acc [BN, BM] (output columns rn x the chunk's slots) out. UP: h[slot] = gelu(acc) (exact erf form) in
        h's dtype; for a 4/2-bit expert in the MMA order of its down projection's codes, with each group's sum
        os[g, slot], so the down projection reads h as _mma_kernel reads x after its prep. Down: the fp32
        partial of split pid_k, out[pid_k, slot] (summed by the combine in a fixed order)."""
        mask = n_ok[:, None] & m_ok[None, :]
        if UP:
            hv = (0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))).to(out_ptr.dtype.element_ty)
            if BITS == 16:
                tl.store(out_ptr + slot64[None, :] * N + rn[:, None], hv, mask=mask)
            else:
                tl.store(out_ptr + slot64[None, :] * N + _mma_pos(rn, BITS)[:, None], hv, mask=mask)
                NGB: tl.constexpr = BN // GROUP  # BN is whole groups (the configs ensure it)
                g = tl.program_id(1) * NGB + tl.arange(0, NGB)
                sums = tl.sum(tl.reshape(hv.to(tl.float32), (NGB, GROUP, BM)), axis=1)
                g_ok = (g < N // GROUP)[:, None] & m_ok[None, :]
                tl.store(os_ptr + g[:, None] * S + slot64[None, :], sums, mask=g_ok)
        else:
            tl.store(out_ptr + (pid_k.to(tl.int64) * S + slot64[None, :]) * N + rn[:, None], acc, mask=mask)

    @triton.jit
    def _moe_out(acc, out_ptr, os_ptr, part_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, UP: tl.constexpr,
                 SPLIT_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
        """A program's result: h into out_ptr (UP in one split), else the fp32 partial of split pid_k into
        part_ptr (UP: summed and stored as h by _moe_up_finish_kernel; down: summed by the combine)."""
        if UP and SPLIT_K == 1:
            _moe_store(acc, out_ptr, os_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, True, BITS, GROUP, BN, BM)
        else:
            _moe_store(acc, part_ptr, os_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, False, BITS, GROUP, BN, BM)

    @triton.jit
    def _moe_kernel(a_ptr, av4_ptr, av2_ptr, as_ptr, w_ptr, p4_ptr, s4_ptr, m4_ptr, p2_ptr, s2_ptr, m2_ptr,
                    tab_ptr, off_ptr, ord_ptr, out_ptr, os_ptr, part_ptr, N, K, R, S, ROW_DIV, stride_a, E,
                    UP: tl.constexpr, GROUP: tl.constexpr, HAS16: tl.constexpr, HAS4: tl.constexpr,
                    HAS2: tl.constexpr, BM: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        """One projection of every routed expert: program (e x slot chunk, n block, K split) multiplies expert e's
        weight rows [BN] with the rows of its slots (plan offsets[e] .. offsets[e + 1] of order), BM at a time
        (chunk c: slots BM c ..; at decode sizes BM covers them all, one chunk, and the weight tile is read
        once). A program with no slot (an unrouted expert: every chunk) returns before any weight load. Rows:
        slot // ROW_DIV of a (up: the slot's token, ROW_DIV = k; down: the slot's h row), natural for 16-bit
        experts, av4 / av2 (MMA order, group sums as_ [K / GROUP, R]) for 4/2-bit ones. tab [2, E]: each
        expert's precision code and place in its stack (w: 16-bit [E16, N, K]; p/s/m 4 and 2: stored tiles,
        scales, mins [Ep, ...]). The precision branch is per program, so one launch serves every precision;
        HAS16/4/2 compile out the absent ones. No loop around the branches: the compiler would hoist each
        branch's tile addressing out of it, and the registers of all three would add up. Stored by _moe_out."""
        chunks = tl.num_programs(0) // E
        e = tl.program_id(0) // chunks  # an expert's chunks side by side: the second finds the tile in L2
        pid_k = tl.program_id(2)
        m0 = tl.load(off_ptr + e) + (tl.program_id(0) % chunks) * BM
        hi = tl.load(off_ptr + e + 1)
        if m0 >= hi:  # no slot here (an unrouted expert: none of its weights is read)
            return
        prec = tl.load(tab_ptr + e)
        j = tl.load(tab_ptr + E + e).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        k_per = K // SPLIT_K  # whole BK tiles and whole groups (the configs ensure it)
        k_lo = pid_k * k_per
        NG = K // GROUP
        i = m0 + tl.arange(0, BM)
        m_ok = i < hi
        slot64 = tl.load(ord_ptr + i, mask=m_ok, other=0).to(tl.int64)
        rows64 = slot64 // ROW_DIV
        if HAS16:
            if prec == 0:
                acc = _dense_acc(w_ptr + j * N * K, a_ptr, rn64, n_ok, rows64, m_ok, K, stride_a, k_lo, k_lo + k_per,
                                 BN, BM, BK, DOT_F32)
                _moe_out(acc, out_ptr, os_ptr, part_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, UP, SPLIT_K, 16, GROUP,
                         BN, BM)
        if HAS4:
            if prec == 1:
                words4 = tl.cdiv(N, _TILE) * NG * _TILE * (GROUP // 8)  # one expert's stored tiles
                acc = _quant_acc(p4_ptr + j * words4, s4_ptr + j * NG * N, m4_ptr + j * NG * N, av4_ptr, as_ptr, rn64,
                                 n_ok, rows64, m_ok, N, K, R, k_lo // GROUP, (k_lo + k_per) // GROUP, 4, GROUP, BN, BM,
                                 ASM, DOT_F32)
                _moe_out(acc, out_ptr, os_ptr, part_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, UP, SPLIT_K, 4, GROUP,
                         BN, BM)
        if HAS2:
            if prec == 2:
                words2 = tl.cdiv(N, _TILE) * NG * _TILE * (GROUP // 16)
                acc = _quant_acc(p2_ptr + j * words2, s2_ptr + j * NG * N, m2_ptr + j * NG * N, av2_ptr, as_ptr, rn64,
                                 n_ok, rows64, m_ok, N, K, R, k_lo // GROUP, (k_lo + k_per) // GROUP, 2, GROUP, BN, BM,
                                 ASM, DOT_F32)
                _moe_out(acc, out_ptr, os_ptr, part_ptr, rn, n_ok, slot64, m_ok, pid_k, N, S, UP, SPLIT_K, 2, GROUP,
                         BN, BM)

    @triton.jit
    def _moe_up_finish_kernel(part_ptr, tab_ptr, off_ptr, ord_ptr, h_ptr, hs_ptr, N, S, E, SPLIT_K: tl.constexpr,
                              GROUP: tl.constexpr, HAS16: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr):
        """h[slot] = gelu(sum of the up projection's SPLIT_K fp32 partials [SPLIT_K, S, N]) for the slots of
        (expert, chunk) program 0 and N block program 1, in a fixed order; stored by _moe_store in the layout its
        expert's down projection reads (BN whole groups). Programs of unrouted experts return at once."""
        chunks = tl.num_programs(0) // E
        e = tl.program_id(0) // chunks
        m0 = tl.load(off_ptr + e) + (tl.program_id(0) % chunks) * BM
        hi = tl.load(off_ptr + e + 1)
        if m0 >= hi:
            return
        prec = tl.load(tab_ptr + e)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < N
        i = m0 + tl.arange(0, BM)
        m_ok = i < hi
        slot64 = tl.load(ord_ptr + i, mask=m_ok, other=0).to(tl.int64)
        tile = part_ptr + slot64[None, :] * N + rn[:, None]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(tile + s * S * N, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS16:
            if prec == 0:
                _moe_store(acc, h_ptr, hs_ptr, rn, n_ok, slot64, m_ok, 0, N, S, True, 16, GROUP, BN, BM)
        if HAS4:
            if prec == 1:
                _moe_store(acc, h_ptr, hs_ptr, rn, n_ok, slot64, m_ok, 0, N, S, True, 4, GROUP, BN, BM)
        if HAS2:
            if prec == 2:
                _moe_store(acc, h_ptr, hs_ptr, rn, n_ok, slot64, m_ok, 0, N, S, True, 2, GROUP, BN, BM)

    @triton.jit
    def _moe_combine_kernel(yp_ptr, w_ptr, out_ptr, S, D, TOPK: tl.constexpr, SPLIT_K: tl.constexpr,
                            BLOCK: tl.constexpr):
        """out[t] = sum_j w[t, j] * y[t * TOPK + j] in out's dtype, y the sum of the down projection's SPLIT_K fp32
        partials [SPLIT_K, S, D]: a fixed order, so the output does not depend on which program ran first."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for jj in tl.static_range(TOPK):
            y = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(yp_ptr + (s * S + t * TOPK + jj) * D + cols, mask=ok, other=0.0)
            acc += tl.load(w_ptr + t * TOPK + jj) * y
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    def _cfg(bn, bk, split, warps, stages):
        return triton.Config({"BN": bn, "BK": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)

    # A handful each, so a first run compiles quickly. BN = 128: two 64-row MMAs a warpgroup. BK: 16-bit columns a
    # K tile (the 4/2-bit branches step one group). Both projections split K: the up projection's N (d_ff) fills
    # the GPU only when many experts are routed, the down projection's (d_model) is smaller still. The up
    # projection's partials ([SPLIT_K, slots, d_ff] fp32, L2-sized at decode) cost little when every expert is
    # routed, and the split stays good whatever the routing the tuner happened to see.
    UP_CONFIGS = [_cfg(128, 64, 2, 4, 4), _cfg(64, 64, 4, 4, 4), _cfg(128, 64, 4, 4, 4), _cfg(128, 128, 2, 8, 3)]
    DOWN_CONFIGS = [_cfg(64, 128, 4, 4, 3), _cfg(128, 64, 4, 4, 4), _cfg(128, 128, 2, 8, 3), _cfg(64, 64, 8, 4, 4)]
    MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in DOWN_CONFIGS)
    MAX_UP_SPLIT = max(c.kwargs["SPLIT_K"] for c in UP_CONFIGS)
    FINISH_BN = 128  # _moe_up_finish_kernel's N block: whole groups (GROUP <= 128)
    # Triton's interpreter (CPU tests): small tiles, and a split where the shape has one
    INTERPRET_CONFIGS = [_cfg(64, 32, 2, 4, 1), _cfg(64, 32, 1, 4, 1)]

    def fits(c, args: dict) -> bool:
        """The kernel takes config c for these arguments: whole BK tiles (16-bit) and whole groups (4/2-bit) a
        K split; BN whole groups where the up projection stores h itself (one split: _moe_store's group sums)."""
        bn, bk, split = c.kwargs["BN"], c.kwargs["BK"], c.kwargs["SPLIT_K"]
        k, group = args["K"], args["GROUP"]
        quant = args["HAS4"] or args["HAS2"]
        if args["UP"] and split == 1 and quant and bn % group:
            return False
        per = k // split
        return k % split == 0 and (not args["HAS16"] or (per % bk == 0 and bk <= k)) and (not quant or per % group == 0)

    def fallback(args: dict):
        """A config the kernel always takes (moe.kernel_supports: K a multiple of 16 and of GROUP <= 128)."""
        bk = next(b for b in (64, 32, 16) if args["K"] % b == 0)
        return _cfg(max(64, args["GROUP"]), bk, 1, 4, 3)

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c for c in configs if fits(c, args)] or [fallback(args)]

    _KEY = ["N", "K", "BM", "GROUP", "HAS16", "HAS4", "HAS2", "UP"]
    _moe_up_tuned = triton.autotune(configs=UP_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                                    **autotune_kwargs())(_moe_kernel)
    _moe_down_tuned = triton.autotune(configs=DOWN_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                                      **autotune_kwargs())(_moe_kernel)
