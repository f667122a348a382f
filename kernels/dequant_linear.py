"""Group-wise 4/2-bit dequantize + linear: y = x @ dequant(qw).T (+ bias).

Weight format (quant.py): codes packed along K in int32 words, code j of a word in bits
[bits*j, bits*(j+1)), one fp16 (scale, min) per group of `group_size` values along K. The words are stored in
tiles, one group of TILE_ROWS rows a contiguous block (`_row_base`, `_word_offsets`), and (scale, min) group-major
[NG, N].

Four regimes, picked from M (rows of x):

- M <= GEMV_M (decode, one row) while a CUDA graph is being captured (and once per shape eagerly, to
  tune it before a capture): `_gemv_kernel`, after `_x_pairs_kernel` rearranges x (K values, tiny) into
  fp16 pairs. Per word it sums code * x in half2 arithmetic by PTX (~1.5 instructions a code, `_word_dot`),
  over tiles of whole groups, each group of 64 rows one stored block (row-major 64-byte pieces of many
  rows ran at half the copy bandwidth on the H100). Eager calls take `_dq_mm_kernel` (below): the GEMV's
  three launches cost more host time than its GPU time saves. Both decode chains (this and the next) are
  tuned as served: each config's whole chain timed from CUDA graphs (tuning.py), not the main kernel
  alone.
- GEMV_M < M < LARGE_M, under CUDA graph capture (and once per shape and M bucket eagerly, to tune it):
  `_mma_kernel`, weight-stationary on tensor cores, after `_x_mma_kernel` rearranges
  x into the order in which an MMA's A operand holds a thread's unpacked words (`_mma_codes`): the codes go
  from registers straight into the MMA, exact in x's dtype, and each group's scale and min are applied to
  the [BN, BM] sums in fp32. H100, M = 16: 1.9-2.3x of bf16 (int4) where `_dq_mm_kernel` ran 1.4-1.5x.
  Not for 2-bit weights in groups of 32 (2 words a group; the MMA order needs blocks of 4): those, and
  eager calls (the chain's launches cost more host time than its GPU time saves), take
- `_dq_mm_kernel` (`path="fused"`): each [BN, BKW] tile of words unpacked in K order in registers
  (tl.join; each group's (scale, min) repeated over its words) and multiplied with a contiguous [BM, BK]
  slice of x, on the FMA units for few rows or on tensor cores (dequantized into x's dtype by PTX, through
  shared memory); the autotuner also tries the older "planes" variant (no unpacking; strided x). Split-K
  (a third grid axis, partial sums reduced by a second small kernel) keeps every SM streaming when N / BN
  is small; the GEMV and the MMA kernel split K the same way, or add their partials into y in place
  (`_split_adds`, a tuned choice).
- M >= LARGE_M: `_dequant_kernel` writes the bf16/fp16 weight once (coalesced: the same K-order
  unpacking), then cuBLAS multiplies (`path="dequant"` forces it). Dequantizing costs one pass over
  N x K (~7 % of the GEMM at M = 4096 on the H100): two launches, but 0.9x of cuBLAS bf16 where a
  Triton GEMM that dequantizes in its main loop ran far behind.

Codes become floats with the 2**23 mantissa trick (an OR and a subtract instead of an int->float
convert). The torch reference is `dequant_linear_ref`.
"""
from __future__ import annotations

import torch

from . import tuning
from ._backend import HAS_TRITON, autotune_kwargs, interpreting, triton, tl
from .quant import TILE_ROWS, QuantizedWeight, dequantize

GEMV_M = 1      # at or below, under CUDA graph capture: the per-row GEMV kernel (_gemv_kernel). Its three
                # launches cost ~150 us of Python a call on the H100 host, so eager calls keep the one-launch
                # _dq_mm_kernel; replayed from a graph the GEMV runs 2.2-4.4x of bf16 vs 1.5-2.3x (H100)
SMALL_M = 16    # at or below: the fused kernel's decode tiles (FMA or 16-row tensor-core tiles)
LARGE_M = 128   # at or above: dequantize once, then cuBLAS (H100: 0.90-0.99x of bf16 at M = 4096; at M = 256
                # 0.50-0.54x, the fused kernel 0.44-0.67x). Below, the MMA chain under graph capture (M = 64:
                # 1.98-2.09x of bf16 at 8192x28672) and the fused kernel eagerly (kernels/BENCH_H100.md)
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


def _pair_shifts(bits: int) -> list[tuple[int, int]]:
    """(word shift, bit position) of each half2 pair p of a word: its two codes (p and p + PW/2, one per 16-bit
    half) sit at `pos` after the shift, with code * 2**pos below 2**10, so ORed into the mantissa of the fp16
    2**(10 - pos) they read as 2**(10 - pos) + code exactly. The same rule as _pair_shift in the kernels."""
    out, sh = [], 0
    for p in range(16 // bits):
        if bits * (p + 1) - sh > 10:
            sh = bits * p
        out.append((sh, bits * p - sh))
    return out


def _pair_sources(bits: int, word: str):
    """Per half2 pair p of `word`: (p, pos, the PTX line that shifts the word into register u when the pair
    needs a new shift (else none), the register holding the pair's codes at pos)."""
    cur = 0
    for p, (sh, pos) in enumerate(_pair_shifts(bits)):
        shift = [f"shr.u32 u, {word}, {sh};"] if sh != cur else []
        cur = sh
        yield p, pos, shift, ("u" if sh else word)


def _dequant_ptx(bits: int, bf16: bool) -> str:
    """PTX for _dequant_pairs: the PW codes of word $PW as code * $PW+1 + $PW+2 (fp16 scale, min), code j into
    output bitrev(j) (the tl.join tree that assembles them reverses the bits of the index). Per pair:
    (word >> shift) & lanes | 2**(10 - pos) in each half (one LOP3), minus 2**(10 - pos) exactly, then one
    fp16 fused multiply-add by the stored (scale, min), rounded once; for bf16 output rounded again from
    there (the reference rounds its fp32 value once; scale and min cast to bf16 first tripled the error)."""
    pw = 32 // bits
    nbit = pw.bit_length() - 1
    rev = [int(f"{j:0{nbit}b}"[::-1], 2) for j in range(pw)]
    w, s, m = f"${pw}", f"${pw + 1}", f"${pw + 2}"
    lines = ["{", ".reg .b32 s2, m2, t, u, k;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
             f"mov.b32 s2, {{{s}, {s}}};", f"mov.b32 m2, {{{m}, {m}}};"]
    for p, pos, shift, src in _pair_sources(bits, w):
        magic = (25 - pos) << 10  # fp16 2**(10 - pos)
        lines += [*shift, f"mov.b32 k, {magic * 0x10001:#010x};",
                  f"lop3.b32 t, {src}, {((1 << bits) - 1 << pos) * 0x10001:#010x}, k, 0xEA;",  # (src & lanes) | k
                  "sub.f16x2 t, t, k;",  # minus 2**(10 - pos): the code, exactly
                  "fma.rn.f16x2 t, t, s2, m2;"]
        if bf16:
            lines += ["mov.b32 {lo, hi}, t;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;",
                      "cvt.rn.bf16x2.f32 t, fhi, flo;"]
        lines.append(f"mov.b32 {{${rev[p]}, ${rev[p + pw // 2]}}}, t;")
    return "\n".join(lines + ["}"])


def _word_dot_ptx(bits: int) -> str:
    """PTX for _word_dot: $0 (f32) = 2**-24 * sum over the word $1's codes of code * x, x's pairs in $2.. (half2).
    A pair's codes masked in place (one AND) are, as fp16 bit patterns, the subnormals code * 2**(pos - 24): exact,
    and HFMA2 takes subnormals at full rate, so no magic number is ORed in and subtracted again (one instruction a
    pair fewer; H100, M = 1, best config of each: 8192x28672 int2 36.3 -> 32.6 us, int4 48.1 -> 47.1). x's pairs
    carry 2**-pos, and products with x near its group's amax are normal fp16 (_x_pairs_kernel scales each group of
    x to +-2**15)."""
    mask = (1 << bits) - 1
    lines = ["{", ".reg .b32 t, u, a;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    for p, pos, shift, src in _pair_sources(bits, "$1"):
        lines += [*shift, f"and.b32 t, {src}, {(mask << pos) * 0x10001:#010x};",
                  f"mul.f16x2 a, t, ${p + 2};" if p == 0 else f"fma.rn.f16x2 a, t, ${p + 2}, a;"]
    lines += ["mov.b32 {lo, hi}, a;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


MMA_MAGIC = {False: 0x6400, True: 0x4300}  # fp16 1024, bf16 128: OR a code into the mantissa, read magic + code


def _codes_ptx(bits: int, bf16: bool) -> str:
    """PTX for _mma_codes: the PW codes of word $PW as fp16 or bf16 magic + code (exact), pair p (codes p and
    p + PW/2, one per 16-bit half) into outputs 2p, 2p + 1: per pair one shift (none for the first) and one LOP3,
    (word >> bits * p) & lanes | magic. The magic is not subtracted here: the kernel folds it into the mins."""
    pw, lanes = 32 // bits, ((1 << bits) - 1) * 0x10001
    lines = ["{", ".reg .b32 t, u, k;", f"mov.b32 k, {MMA_MAGIC[bf16] * 0x10001:#010x};"]
    for p in range(pw // 2):
        src = f"${pw}" if p == 0 else "u"
        lines += [f"shr.u32 u, ${pw}, {bits * p};"] if p else []
        lines += [f"lop3.b32 t, {src}, {lanes:#010x}, k, 0xEA;", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, t;"]
    return "\n".join(lines + ["}"])


def mma_order(bits: int, k: int) -> torch.Tensor:
    """Column k of x -> its place in the MMA order of _x_mma_kernel (the torch statement of it, for tests):
    code c of word kw sits at 4 PW (kw // 4) + 8 (c % PP) + 2 (kw % 4) + c // PP."""
    pw = 32 // bits
    kk = torch.arange(k)
    kw, c = kk // pw, kk % pw
    return 4 * pw * (kw // 4) + 8 * (c % (pw // 2)) + 2 * (kw % 4) + c // (pw // 2)


if HAS_TRITON:
    try:  # programmatic dependent launch (Hopper on): a kernel's launch overlaps the tail of the one before
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        HAS_PDL = True
    except ImportError:  # pragma: no cover - older Triton
        HAS_PDL = False

        @triton.jit
        def gdc_launch_dependents():
            pass

        @triton.jit
        def gdc_wait():
            pass

    _PTX4 = tl.constexpr(_word_dot_ptx(4))
    _PTX2 = tl.constexpr(_word_dot_ptx(2))
    _DQ4_F16, _DQ4_BF16 = tl.constexpr(_dequant_ptx(4, False)), tl.constexpr(_dequant_ptx(4, True))
    _DQ2_F16, _DQ2_BF16 = tl.constexpr(_dequant_ptx(2, False)), tl.constexpr(_dequant_ptx(2, True))
    _C4_F16, _C4_BF16 = tl.constexpr(_codes_ptx(4, False)), tl.constexpr(_codes_ptx(4, True))
    _C2_F16, _C2_BF16 = tl.constexpr(_codes_ptx(2, False)), tl.constexpr(_codes_ptx(2, True))


    _TILE = tl.constexpr(TILE_ROWS)

    @triton.jit
    def _row_base(rn64, NG, WPG: tl.constexpr):
        """Offset of rows rn64's first word in the stored tiles [N / TILE_ROWS, NG, TILE_ROWS, WPG]."""
        return (rn64 // _TILE) * (NG * _TILE * WPG) + (rn64 % _TILE) * WPG

    @triton.jit
    def _word_offsets(kw, WPG: tl.constexpr):
        """Offset of words kw of a row from its _row_base: group kw // WPG is a block of TILE_ROWS x WPG words."""
        return (kw // WPG) * (_TILE * WPG) + kw % WPG

    @triton.jit
    def _codes_to_float(c):
        # 2**23 + code as a float bit pattern: exact, and cheaper than an int->float convert.
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dequant_words(words, sc, mn, BITS: tl.constexpr):
        """[R, W] int32 words and (scale, min) per word [R, W] or per row [R, 1] -> [R, W * 32 // BITS] fp32 in K
        order. Each tl.join halves the code width and adds a minor dimension of 2 held by the same thread,
        so the scale broadcasts over those dimensions and the final reshape moves no data. (Scales gathered
        per value instead cost 6-25x on the H100: the loads, not the arithmetic, were the bottleneck.)"""
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
        # load put a DRAM round trip on every iteration (the M = 16 limit on the H100)
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
    def _splitk_reduce_kernel(p_ptr, y_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr = False):
        """y = sum over the SPLIT_K fp32 partial outputs, cast to y's dtype. PDL: launched early, so wait for
        the partials."""
        if PDL:
            gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(p_ptr + s * numel + offs, mask=ok, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _zero_row_share(y_ptr, N, BLOCK: tl.constexpr = 1024):
        """Zero program (i, m)'s share of row m of y [M, N], N split over the programs of axis 0: a decode
        chain's prep kernel clears y for the split-K partials that the main kernel adds into it (_store_out)."""
        per = tl.cdiv(N, tl.num_programs(0))
        lo = tl.program_id(0) * per
        row = y_ptr + tl.program_id(1).to(tl.int64) * N
        for j in range(lo, lo + per, BLOCK):
            cols = j + tl.arange(0, BLOCK)
            tl.store(row + cols, tl.zeros((BLOCK,), y_ptr.dtype.element_ty), mask=(cols < lo + per) & (cols < N))

    @triton.jit
    def _store_out(acc, y_ptr, p_ptr, offs, mask, pid_k, M, N, SPLIT_K: tl.constexpr, ADD: tl.constexpr):
        """fp32 acc into y in its dtype; with SPLIT_K > 1 this split's partial, added into y (ADD: y zeroed by
        the chain's prep kernel, one red.global.add in y's dtype, no reduction kernel) or stored in fp32 to
        p[pid_k] for _splitk_reduce_kernel."""
        if SPLIT_K == 1:
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        elif ADD:
            tl.atomic_add(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask, sem="relaxed")
        else:
            tl.store(p_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)

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
        x's group sum. (Summing each group's words before scaling was faster alone but slower in the chain on
        the H100: 2-bit 8192x28672 34.9 against 33.6 us a call; scripts/layout_probe.py, BENCH_H100.md.)"""
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
        x's group scaling, undone), and per group the min times the group's x sum (_gemv_tile). ~2.4 (int4) and
        ~1.9 (int2) SASS instructions a code in the compiled loop (sm_90; BN 64, BKW 64 and 32, 4 warps) against ~4
        for fp32 codes. A tile's rows of one group lie in one stored block (a group of 64 rows, contiguous:
        ttha.quant), so it streams from DRAM in long pieces. With SPLIT_K > 1 each K range adds its partial into y
        (ADD) or writes it to p[pid_k] (_store_out). PDL: launched while _x_pairs_kernel runs, so the first tile
        (words, scales, mins: nothing _x_pairs_kernel writes) is loaded before waiting for x's pairs (H100, M = 1:
        0.2-0.6 us a call less), then the reduction may launch."""
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

    @triton.jit
    def _mma_magic(BF16: tl.constexpr):
        """The value of MMA_MAGIC (fp16 1024, bf16 128): magic + code is what _mma_codes gives."""
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
        the scale, min and magic applied to [BN, BM] sums instead of to every code, so the loop costs ~2.6 SASS
        instructions a code (sm_90, int4) where _dq_mm_kernel's costs 6.5. With SPLIT_K > 1 each range of groups
        adds its partial into y (ADD) or writes it to p[pid_k] (_store_out). PDL: launched while _x_mma_kernel
        runs, so wait for xv."""
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
        *(_cfg(bm, bn, bkw, split, False, warps, planes=True)  # the 2026-11-23 decode path (0.8-1.2x bf16)
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


    # NUM_STAGES (kernel default 1) stays out of the tuned space: pipelining the loads through shared memory
    # gained nothing once tiles were wide (H100 sweep, scripts/gemv_sweep.py); so did loading each tile one
    # iteration ahead in registers (int4 57.6 -> 65.0 us at 8192x28672)
    GEMV_CONFIGS = [triton.Config({"BN": bn, "BKW": bkw, "SPLIT_K": split}, num_warps=warps)
                    for bn, warps in ((32, 2), (64, 4), (64, 8), (128, 4), (128, 8)) for bkw in (8, 16, 32, 64, 128)
                    for split in (1, 2, 4, 8, 16)]
    GEMV_MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS)  # sizes the partial-sum buffer
    MIN_PROGRAMS = 132  # one per SM of an H100: fewer leave SMs idle
    # Most programs an SM in the decode spaces. With the split-K partials added in place (_split_adds) a wide split
    # costs no reduction, and the H100's fastest M = 16 tiles at 8192x28672 run 13-27 programs an SM (int4 BN 64
    # split 8: 51.1 us, against 53.3 for the best at 8 or fewer). (At 4, the fastest 2-bit tile had been left out.)
    MAX_PER_SM = 32

    def _fill_sms(fits: list, n: int, ok=lambda c: True) -> list:
        """The configs (BN rows x SPLIT_K programs) that pass `ok` and give 1 to MAX_PER_SM programs per SM; shapes
        too small for that (tests, toy models) get the configs with the most programs the shape allows."""
        programs = lambda c: -(-n // c.kwargs["BN"]) * c.kwargs["SPLIT_K"]  # noqa: E731
        fill = [c for c in fits if ok(c) and MIN_PROGRAMS <= programs(c) <= MAX_PER_SM * MIN_PROGRAMS]
        if fill:
            return fill
        most = max(programs(c) for c in fits)
        return [c for c in fits if programs(c) == most][:4]

    def _prune_gemv(configs, named_args, **kwargs):
        """Tiles of whole groups, whole tiles per split, 16-32 words a thread (where the best tiles of the H100
        sweep lay, scripts/gemv_sweep.py) and 1 to MAX_PER_SM programs per SM; shapes too small for that get the
        configs with the most programs."""
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


    # Weight-stationary tensor-core decode (_mma_kernel): BM the M bucket (16 at least: the MMA's N side)
    # BN = 256 a warpgroup: x is read once for more rows (H100, tiled words: int4 55.6 us at 8192x28672, M = 16,
    # against 57.4 for the best BN = 128)
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
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](partials, y, m * n, SPLIT_K=split, BLOCK=1024, **pdl_kw)
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
    dispatch and no reduction launch, which were most of an eager decode call's host time (H100 host, 4096x14336,
    one process: paced calls 5591 -> 9292/s at M = 1 int4, 5691 -> 8227/s at M = 16 int4; scratch A/B, 2026-11-24)."""
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
    y = _launch_split_k(_dq_mm_kernel, _dq_mm_tuned,
                        lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(m, c["BM"]), int(c["SPLIT_K"])),
                        inputs, (m, n, k, _m_bucket(m), x2.stride(0)), meta, config, max_split, m, n, x2,
                        add=_split_adds(x2, config))
    if picked is not None and picked not in _MM_PICKED:  # this key's first call: remember the config that ran
        if config is None:
            best = _dq_mm_tuned.best_config
            config = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        _MM_PICKED[picked] = dict(config, ADD=True)
    return y


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled (not the interpreter), on Hopper or newer."""
    return (HAS_PDL and not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _split_adds(x2: torch.Tensor, config: dict | None) -> bool:
    """Whether split-K partials are added into y by the main kernel (config ADD; y zeroed by a chain's prep kernel
    or, eagerly, torch.zeros; red.global.add in x's dtype) instead of written in fp32 for a reduction kernel: one
    launch and the partials' round trip fewer, faster for most split tiles (H100, M = 16, 8192x28672: int4 best
    55.5 -> 51.1 us, int2 44.0 -> 40.2) but not all (M = 1 at 14336x4096: 14.2 against 15.2 us), so the chain
    tuner tries both (_chain_config). Each partial is rounded to x's dtype before it is added (relerr 4.7e-3 at
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
            copies.extend(tuning.rotating(lambda: QuantizedWeight(qw.packed.clone(), qw.scales.clone(), qw.mins.clone(),
                                                           qw.bits, qw.group_size, qw.shape), qw.nbytes))
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
        config = _chain_config("gemv", _run_gemv, x2, qw, bias, lambda: _prune_gemv(
            GEMV_CONFIGS, {"BITS": qw.bits, "GROUP": qw.group_size, "KW": kw, "N": qw.shape[0]}))
    return _run_gemv(x2, qw, bias, config)


def _run_gemv(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    m, (n, k) = x2.shape[0], qw.shape
    pw = 32 // qw.bits
    kw, ng = k // pw, k // qw.group_size
    xp = torch.empty((m, pw // 2 * kw), dtype=torch.int32, device=x2.device)
    xg = torch.empty((m, 2 * ng), dtype=torch.float32, device=x2.device)
    return _launch_chain(x2, qw, bias, config, _x_pairs_kernel, (xp, xg), (kw, ng), _gemv_kernel, _gemv_tuned,
                         GEMV_MAX_SPLIT, lambda c: (triton.cdiv(n, c["BN"]), m, int(c["SPLIT_K"])), (m, n, kw, ng))


def mma_ok(qw: QuantizedWeight) -> bool:
    """_mma_kernel takes the weight: whole 4-word blocks a group (all but 2-bit with groups of 32)."""
    return (qw.group_size * qw.bits // 32) % 4 == 0


def _launch_mma(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    """Decode rows on tensor cores: x in MMA order with its group sums (one small kernel), the weight-stationary
    matmul, the split-K reduction when the config splits; with `config`, else the chain's tuned config (small
    fixed tiles on the interpreter)."""
    ng = qw.shape[1] // qw.group_size
    if config is None and interpreting():
        config = {"BN": 64, "SPLIT_K": 2 if ng % 2 == 0 else 1}
    if config is None:
        config = _chain_config("mma", _run_mma, x2, qw, bias, lambda: _prune_mma(
            MMA_CONFIGS, {"GROUP": qw.group_size, "K": qw.shape[1], "N": qw.shape[0]}))
    return _run_mma(x2, qw, bias, config)


def _run_mma(x2: torch.Tensor, qw: QuantizedWeight, bias, config: dict | None) -> torch.Tensor:
    m, (n, k) = x2.shape[0], qw.shape
    kw, ng = k * qw.bits // 32, k // qw.group_size
    bm = max(16, min(_m_bucket(m), 64))
    xv = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
    xs = torch.empty((ng, m), dtype=torch.float32, device=x2.device)
    return _launch_chain(x2, qw, bias, config, _x_mma_kernel, (xv, xs), (m, kw, ng), _mma_kernel, _mma_tuned,
                         MMA_MAX_SPLIT, lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(m, bm), int(c["SPLIT_K"])),
                         (m, n, k, _m_bucket(m)), DOT_F32=interpreting(), BM=bm)


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


PATHS = ("auto", "gemv", "mma", "fused", "dequant")
_CHAIN_TUNED: set[tuple] = set()  # (kernel, *_decode_key) whose chain has run eagerly (so is tuned)


def _chain_now(kind: str, x2: torch.Tensor, qw: QuantizedWeight, bias) -> bool:
    """The multi-launch decode chains (x rearranged, then the GEMV or the MMA kernel, then maybe a split-K
    reduction) serve under CUDA graph capture, and once per shape and M bucket eagerly: that first call tunes
    them (tuning.py: the whole chain timed per config, kept on disk), as the warm-up before a capture must
    (timing cannot run inside one). Other eager calls take the one-launch matmul: on the H100 host the chain's
    extra launches cost more host time than its GPU time saves (M = 16, 14336x4096: 302 us a call eagerly against
    140 for the matmul kernel; 25 us of GPU time from a graph against 33)."""
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
    elif path == "mma" or (path == "auto" and m > GEMV_M and config is None and mma_ok(qw)
                           and _chain_now("mma", x2, qw, bias)):
        if not mma_ok(qw):
            raise ValueError(f"path='mma': qweight.group_size={qw.group_size} holds {qw.group_size * qw.bits // 32} "
                             f"words at bits={qw.bits}; the MMA path needs a multiple of 4")
        y = _launch_mma(x2, qw, bias, config)
    else:
        y = _launch_mm(x2, qw, bias, config)
    return y.reshape(*lead, n)
