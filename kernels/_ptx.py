"""Inline PTX of the decode kernels, built per bit width (and output dtype) as strings.

Each packed word holds PW = 32 / bits codes; the PTX takes two codes at a time, one in each 16-bit half of a
register (a half2 pair), and turns them into fp16/bf16 values with integer masks instead of int->float converts.
Plain Python, so the CPU tests simulate exactly the PTX the GPU runs (Triton's interpreter cannot run PTX).
"""
from __future__ import annotations


def _pair_shifts(bits: int) -> list[tuple[int, int]]:
    """(word shift, bit position) of each half2 pair p of a word: its two codes (p and p + PW/2, one per 16-bit
    half) sit at `pos` after the shift, with code * 2**pos below 2**10, so ORed into the mantissa of the fp16
    2**(10 - pos) they read as 2**(10 - pos) + code exactly. The same rule as _pair_shift in gemv.py."""
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
    """PTX for _dequant_pairs (fused.py): the PW codes of word $PW as code * $PW+1 + $PW+2 (fp16 scale, min), code
    j into output bitrev(j) (the tl.join tree that assembles them reverses the bits of the index). Per pair:
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
    """PTX for _word_dot (gemv.py): $0 (f32) = 2**-24 * sum over the word $1's codes of code * x, x's pairs in $2..
    (half2). A pair's codes masked in place (one AND) are, as fp16 bit patterns, the subnormals code * 2**(pos - 24):
    exact, and HFMA2 takes subnormals at full rate, so no magic number is ORed in and subtracted again (one
    instruction a pair fewer). x's pairs carry 2**-pos, and products with x near its group's amax are normal fp16
    (_x_pairs_kernel scales each group of x to +-2**15)."""
    mask = (1 << bits) - 1
    lines = ["{", ".reg .b32 t, u, a;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    for p, pos, shift, src in _pair_sources(bits, "$1"):
        lines += [*shift, f"and.b32 t, {src}, {(mask << pos) * 0x10001:#010x};",
                  f"mul.f16x2 a, t, ${p + 2};" if p == 0 else f"fma.rn.f16x2 a, t, ${p + 2}, a;"]
    lines += ["mov.b32 {lo, hi}, a;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


MMA_MAGIC = {False: 0x6400, True: 0x4300}  # fp16 1024, bf16 128: OR a code into the mantissa, read magic + code


def _codes_ptx(bits: int, bf16: bool) -> str:
    """PTX for _mma_codes (mma.py): the PW codes of word $PW as fp16 or bf16 magic + code (exact), pair p (codes p and
    p + PW/2, one per 16-bit half) into outputs 2p, 2p + 1: per pair one shift (none for the first) and one LOP3,
    (word >> bits * p) & lanes | magic. The magic is not subtracted here: the kernel folds it into the mins."""
    pw, lanes = 32 // bits, ((1 << bits) - 1) * 0x10001
    lines = ["{", ".reg .b32 t, u, k;", f"mov.b32 k, {MMA_MAGIC[bf16] * 0x10001:#010x};"]
    for p in range(pw // 2):
        src = f"${pw}" if p == 0 else "u"
        lines += [f"shr.u32 u, ${pw}, {bits * p};"] if p else []
        lines += [f"lop3.b32 t, {src}, {lanes:#010x}, k, 0xEA;", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, t;"]
    return "\n".join(lines + ["}"])
