"""Can mma.sync with explicit layouts (Gluon) beat the shipped wgmma decode kernel at M = 16? A probe, not shipped.

_mma_kernel (dequant_linear.py) feeds the codes to wgmma from registers; Triton 3.6 splits such a wgmma into
K = 16 steps and waits on each. This probe writes the same exact math (magic + code in x's dtype times x on
tensor cores, fp32 sums, each group's (scale, min) applied to the [BN, 16] sums) with mma.sync (m16n8k16) in
Gluon, where the layouts are explicit:
- each thread loads WPG / 4 contiguous words of a row per group (one 16-byte vector for int4 g128) and unpacks
  them (_codes_ptx) straight into the A operand of DotOperandLayout(k_width=8); convert_layout(assert_trivial)
  proves no data moves. For that the K order inside a group is relabelled (logical 32 j + 8 t + e holds
  in-word position 8 (NCH t + j) + e, each PTX pair one 32-bit register) and x is permuted the same way by
  _x_prep_kernel;
- words and x stream through shared memory by cp.async, STAGES deep, GPI groups an iteration (so each row is
  read in GPI x 64-byte pieces); scales, mins and x sums are loaded an iteration ahead into registers.
Checked against dequant_linear_ref (4-bit groups 32-128, 2-bit 64 and 128; M = 2, 3, 16; ragged N; fp16, bf16), then
timed over a config sweep from CUDA graphs beside bf16 F.linear and the shipped chain (kernels/BENCH_H100.md,
eleventh version, has what it found).
python scripts/gluon_mma_probe.py OUT_DIR   (GPU, Triton >= 3.6 with Gluon; MAXNREG="0,128,168" also sweeps
register caps)"""
import csv
import itertools
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ttha.kernels.dequant_linear import _codes_ptx, _splitk_reduce_kernel, dequant_linear_ref, dequant_linear_triton
from ttha.kernels.timing import graph_us, rotating
from ttha.quant import quantize

MAXNREG = [int(v) for v in os.environ.get("MAXNREG", "0").split(",")]  # register caps to sweep (0: none)
_C4_F16, _C4_BF16 = gl.constexpr(_codes_ptx(4, False)), gl.constexpr(_codes_ptx(4, True))
_C2_F16, _C2_BF16 = gl.constexpr(_codes_ptx(2, False)), gl.constexpr(_codes_ptx(2, True))


def _blocked(shape, vec, warps):
    """A 2-D BlockedLayout for a cp.async copy: `vec` elements a thread along dim 1, lanes along dim 1 first."""
    tk = min(32, shape[1] // vec)
    tr = 32 // tk
    return gl.BlockedLayout([1, vec], [tr, tk], [warps, 1], [1, 0])


def layouts(bits, group, warps, reps, gpi):
    """The kernel's layouts for BN = 16 warps reps rows (reps m16 tiles a warp) and GPI groups an iteration."""
    wpg, bn = group * bits // 32, 16 * warps * reps
    vw, lg = wpg // 4, int(math.log2(gpi))
    reps_rows = [[16 * warps << i, 0] for i in range(int(math.log2(reps)))]
    warp_rows = [[16 << i, 0] for i in range(int(math.log2(warps)))]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    return dict(
        MMA=mma, LA=gl.DotOperandLayout(0, mma, 8), LB=gl.DotOperandLayout(1, mma, 8),
        # [BN, WPG] words: VW contiguous words a thread (lanes t = 0..3 along the group), rows as the A operand's
        LW=gl.DistributedLinearLayout(reg_bases=[[0, 1 << i] for i in range(int(math.log2(vw)))] + [[8, 0]] + reps_rows,
                                      lane_bases=[[0, vw], [0, 2 * vw], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warp_rows, block_bases=[], shape=[bn, wpg]),
        # [BN, GPI] scales / mins: rows as the MMA layout's row slice, the GPI groups in registers
        LS=gl.DistributedLinearLayout(reg_bases=[[0, 1 << i] for i in range(lg)] + [[8, 0]] + reps_rows,
                                      lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warp_rows, block_bases=[], shape=[bn, gpi]),
        # [16, GPI] x sums: columns as the MMA layout's column slice
        LXS=gl.DistributedLinearLayout(reg_bases=[[0, 1 << i] for i in range(lg)] + [[1, 0], [8, 0]],
                                       lane_bases=[[2, 0], [4, 0], [0, 0], [0, 0], [0, 0]],
                                       warp_bases=[[0, 0]] * int(math.log2(warps)), block_bases=[], shape=[16, gpi]),
        LCW=_blocked([gpi * bn, wpg], min(4, wpg), warps), LCX=_blocked([gpi * 16, group], 8, warps),
        SW=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), SX=gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))


@gluon.jit
def _j2(c, a: gl.constexpr, b: gl.constexpr):
    return gl.join(c[a], c[b])


@gluon.jit
def _unpack(words, BITS: gl.constexpr, BF16: gl.constexpr):
    """_codes_ptx on each word: c[2p] = code p, c[2p + 1] = code p + PW / 2, as magic + code in x's dtype."""
    PW: gl.constexpr = 32 // BITS
    ptx: gl.constexpr = (_C4_BF16 if BF16 else _C4_F16) if BITS == 4 else (_C2_BF16 if BF16 else _C2_F16)
    cons: gl.constexpr = "=h," * PW + "r"
    if BF16:
        return gl.inline_asm_elementwise(ptx, cons, [words], dtype=(gl.bfloat16,) * PW, is_pure=True, pack=1)
    else:
        return gl.inline_asm_elementwise(ptx, cons, [words], dtype=(gl.float16,) * PW, is_pure=True, pack=1)


@gluon.jit
def _a_operand(words, BITS: gl.constexpr, BF16: gl.constexpr, GROUP: gl.constexpr, LA: gl.constexpr):
    """[BN, WPG] words -> the [BN, GROUP] A operand in the relabelled K order, without moving data."""
    R: gl.constexpr = words.shape[0]
    NCH: gl.constexpr = GROUP // 32
    c = _unpack(words, BITS, BF16)
    # in-word order q = 2 p + h for code p + PW/2 h (each PTX pair stays one 32-bit register): join over p's bits
    # from the top, h last
    if BITS == 4:
        v = gl.join(gl.join(_j2(c, 0, 4), _j2(c, 2, 6)), gl.join(_j2(c, 1, 5), _j2(c, 3, 7)))
    else:
        v = gl.join(gl.join(gl.join(_j2(c, 0, 8), _j2(c, 4, 12)), gl.join(_j2(c, 2, 10), _j2(c, 6, 14))),
                    gl.join(gl.join(_j2(c, 1, 9), _j2(c, 5, 13)), gl.join(_j2(c, 3, 11), _j2(c, 7, 15))))
    a = gl.reshape(v, [R, GROUP])  # in-word order: 8 (NCH t + j) + e
    a = gl.reshape(gl.permute(gl.reshape(a, [R, 4, NCH, 8]), [0, 2, 1, 3]), [R, GROUP])  # 32 j + 8 t + e
    return gl.convert_layout(a, LA, assert_trivial=True)


@gluon.jit
def _cols(t, GPI: gl.constexpr):
    """[R, GPI] (GPI in registers) -> its GPI columns, each [R]."""
    R: gl.constexpr = t.shape[0]
    if GPI == 1:
        return (gl.reshape(t, [R]),)
    elif GPI == 2:
        return gl.split(t)
    else:
        a, b = gl.split(gl.reshape(t, [R, 2, 2]))  # columns 0, 2 and 1, 3
        a0, a2 = gl.split(a)
        b1, b3 = gl.split(b)
        return a0, b1, a2, b3


@gluon.jit
def _issue(w_smem, x_smem, slot, w_ptrs, x_ptrs, g, WPG: gl.constexpr, GROUP: gl.constexpr):
    cp.async_copy_global_to_shared(w_smem.index(slot), w_ptrs + g * WPG)
    cp.async_copy_global_to_shared(x_smem.index(slot), x_ptrs + g * GROUP)
    cp.commit_group()


@gluon.jit
def _mma_sync_kernel(xv_ptr, xs_ptr, w_ptr, s_ptr, m_ptr, y_ptr, p_ptr, M, N, K, KW, NG,
                     BITS: gl.constexpr, GROUP: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                     GPI: gl.constexpr, LW: gl.constexpr, MMA: gl.constexpr, LA: gl.constexpr, LB: gl.constexpr,
                     LS: gl.constexpr, LXS: gl.constexpr, LCW: gl.constexpr, LCX: gl.constexpr, SW: gl.constexpr,
                     SX: gl.constexpr):
    """y [M <= 16, N] = x @ dequant(w).T from xv (x relabelled, 16 rows) and xs [NG, 16] (x's group sums)."""
    WPG: gl.constexpr = GROUP * BITS // 32
    BN: gl.constexpr = LW.shape[0]
    BF16: gl.constexpr = xv_ptr.dtype.element_ty == gl.bfloat16
    MAGIC: gl.constexpr = 128.0 if BF16 else 1024.0
    row0 = gl.program_id(0) * BN
    pid_k = gl.program_id(1)
    # copies: [GPI * BN, WPG] words and [GPI * 16, GROUP] x a stage, group-major; rows clamped, not masked
    cw = gl.arange(0, GPI * BN, layout=gl.SliceLayout(1, LCW))
    cw_r = gl.minimum(row0 + cw % BN, N - 1).to(gl.int64)
    wk = gl.arange(0, WPG, layout=gl.SliceLayout(0, LCW))
    w_ptrs = w_ptr + (cw_r * KW + (cw // BN) * WPG)[:, None] + wk[None, :]
    cx = gl.arange(0, GPI * 16, layout=gl.SliceLayout(1, LCX))
    xk = gl.arange(0, GROUP, layout=gl.SliceLayout(0, LCX))
    x_ptrs = xv_ptr + ((cx % 16) * K + (cx // 16) * GROUP)[:, None] + xk[None, :]
    rs = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LS)), N - 1).to(gl.int64)
    s_off = rs[:, None] * NG + gl.arange(0, GPI, layout=gl.SliceLayout(0, LS))[None, :]
    xs_ptrs = xs_ptr + (gl.arange(0, GPI, layout=gl.SliceLayout(0, LXS))[None, :] * 16
                        + gl.arange(0, 16, layout=gl.SliceLayout(1, LXS))[:, None])
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, GPI * BN, WPG], SW)
    x_smem = gl.allocate_shared_memory(xv_ptr.dtype.element_ty, [STAGES, GPI * 16, GROUP], SX)
    iters = NG // (SPLIT_K * GPI)
    g_lo = pid_k * iters * GPI
    for s in gl.static_range(STAGES - 1):
        _issue(w_smem, x_smem, s, w_ptrs, x_ptrs, g_lo + gl.minimum(s, iters - 1) * GPI, WPG, GROUP)
    acc = gl.zeros([BN, 16], gl.float32, MMA)
    zero = gl.zeros([BN, 16], gl.float32, MMA)
    sc_n, mn_n, xs_n = gl.load(s_ptr + s_off + g_lo), gl.load(m_ptr + s_off + g_lo), gl.load(xs_ptrs + g_lo * 16)
    for i in range(iters):
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()  # every thread's copies of slot i landed; slot i - 1 is free to refill
        _issue(w_smem, x_smem, (i + STAGES - 1) % STAGES, w_ptrs, x_ptrs,
               g_lo + gl.minimum(i + STAGES - 1, iters - 1) * GPI, WPG, GROUP)
        sc_t, mn_t, xs_t = _cols(sc_n, GPI), _cols(mn_n, GPI), _cols(xs_n, GPI)
        gn = g_lo + gl.minimum(i + 1, iters - 1) * GPI
        sc_n, mn_n, xs_n = gl.load(s_ptr + s_off + gn), gl.load(m_ptr + s_off + gn), gl.load(xs_ptrs + gn * 16)
        slot = i % STAGES
        for gi in gl.static_range(GPI):
            a = _a_operand(w_smem.index(slot).slice(gi * BN, BN).load(LW), BITS, BF16, GROUP, LA)
            d = mma_v2(a, x_smem.index(slot).slice(gi * 16, 16).permute([1, 0]).load(LB), zero)
            sc = gl.convert_layout(sc_t[gi], gl.SliceLayout(1, MMA), assert_trivial=True).to(gl.float32)
            mn = gl.convert_layout(mn_t[gi], gl.SliceLayout(1, MMA), assert_trivial=True).to(gl.float32)
            xs = gl.convert_layout(xs_t[gi], gl.SliceLayout(0, MMA), assert_trivial=True)
            acc = gl.fma(d, sc[:, None], acc)
            acc = gl.fma((mn - MAGIC * sc)[:, None], xs[None, :], acc)
    cp.wait_group(0)
    rn = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    cm = gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
    offs = cm.to(gl.int64)[None, :] * N + rn[:, None]
    omask = (cm < M)[None, :] & (rn < N)[:, None]
    if SPLIT_K == 1:
        gl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        gl.store(p_ptr + pid_k.to(gl.int64) * M * N + offs, acc, mask=omask)


@triton.jit
def _x_prep_kernel(x_ptr, xv_ptr, xs_ptr, M, K, stride_xm, BITS: tl.constexpr, GROUP: tl.constexpr):
    """x [M, K] -> xv [16, K] (rows >= M zero) in the kernel's K order, xs [NG, 16] fp32 group sums. Logical
    32 j + 8 t + e of a group holds in-word position q = 8 (NCH t + j) + e: word q // PW, code
    (q % PW) // 2 + PW / 2 ((q % PW) % 2)."""
    PW: tl.constexpr = 32 // BITS
    NCH: tl.constexpr = GROUP // 32
    g, m = tl.program_id(0), tl.program_id(1)
    lg = tl.arange(0, GROUP)
    q = 8 * (NCH * ((lg // 8) % 4) + lg // 32) + lg % 8
    r = q % PW
    phys = PW * (q // PW) + r // 2 + (PW // 2) * (r % 2)
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + g * GROUP + phys, mask=m < M, other=0.0)
    tl.store(xv_ptr + m.to(tl.int64) * K + g * GROUP + lg, x)
    tl.store(xs_ptr + g * 16 + m, tl.sum(x.to(tl.float32), axis=0))


def mma_sync_linear(x2, qw, warps=4, reps=2, split=1, stages=2, gpi=2, maxnreg=0):
    """The probe's chain: x-prep, _mma_sync_kernel (registers a thread capped at maxnreg when > 0), split-K
    reduction."""
    m, (n, k) = x2.shape[0], qw.shape
    ng = k // qw.group_size
    if m > 16 or ng % (split * gpi):
        raise ValueError(f"M={m} > 16 or {ng} groups not a multiple of split {split} x gpi {gpi}")
    xv = torch.empty((16, k), dtype=x2.dtype, device=x2.device)
    xs = torch.empty((ng, 16), dtype=torch.float32, device=x2.device)
    _x_prep_kernel[(ng, 16)](x2, xv, xs, m, k, x2.stride(0), BITS=qw.bits, GROUP=qw.group_size)
    bn = 16 * warps * reps
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    p = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else y
    _mma_sync_kernel[(triton.cdiv(n, bn), split)](xv, xs, qw.packed, qw.scales, qw.mins, y, p, m, n, k,
                                                  k * qw.bits // 32, ng, BITS=qw.bits, GROUP=qw.group_size,
                                                  SPLIT_K=split, STAGES=stages, GPI=gpi, num_warps=warps,
                                                  **({"maxnreg": maxnreg} if maxnreg else {}),
                                                  **layouts(qw.bits, qw.group_size, warps, reps, gpi))
    if split > 1:
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](p, y, m * n, SPLIT_K=split, BLOCK=1024)
    return y


def relerr(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out: str) -> None:
    torch.manual_seed(0)
    for (k, n), bits, group, m, dt in itertools.product([(256, 200), (1024, 4096)], (4, 2), (32, 64, 128), (2, 3, 16),
                                                       (torch.bfloat16, torch.float16)):
        if bits == 2 and group == 32:
            continue  # 2 words a group: fewer than the 4 lanes that share one
        qw = quantize(torch.randn(n, k, device="cuda"), bits, group)
        x = torch.randn(m, k, device="cuda", dtype=dt)
        e = relerr(mma_sync_linear(x, qw, 4, 2, 2 if (k // group) % 4 == 0 else 1), dequant_linear_ref(x, qw))
        assert e < 1e-2, f"K{k} N{n} bits{bits} g{group} M{m} {dt}: relerr {e:.2e}"
    print("checks passed (relerr < 1e-2 against dequant_linear_ref)")
    rows = []
    for (k, n), bits in itertools.product([(4096, 14336), (14336, 4096), (8192, 28672)], (4, 2)):
        w = torch.randn(n, k, device="cuda") * 0.02
        qws = rotating(lambda: quantize(w, bits, 128), n * k * bits // 8)
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        bf = graph_us(lambda t: torch.nn.functional.linear(x, t), rotating(lambda: w.to(torch.bfloat16), n * k * 2))
        shipped = graph_us(lambda q: dequant_linear_triton(x, q), qws)
        for (warps, reps), split, stages, gpi, maxnreg in itertools.product(
                ((4, 1), (4, 2), (8, 1)), (1, 2, 4, 8), (2, 3, 4), (2, 4), MAXNREG):
            bn = 16 * warps * reps
            smem = stages * gpi * (bn * 16 * bits + 16 * 128 * 2)
            if (k // 128) % (split * gpi) or not 120 <= -(-n // bn) * split <= 132 * 4 or smem > 200 * 1024:
                continue
            us = graph_us(lambda q: mma_sync_linear(x, q, warps, reps, split, stages, gpi, maxnreg), qws)
            rows.append(dict(K=k, N=n, bits=bits, warps=warps, reps=reps, split=split, stages=stages, gpi=gpi,
                             maxnreg=maxnreg,
                             us=round(us, 2), bf16_us=round(bf, 2), shipped_us=round(shipped, 2)))
        best = min((r for r in rows if (r["K"], r["N"], r["bits"]) == (k, n, bits)), key=lambda r: r["us"])
        print(f"K{k} N{n} int{bits} M=16: bf16 {bf:.1f} us, shipped chain {shipped:.1f} us ({bf / shipped:.2f}x), "
              f"mma.sync best {best['us']:.1f} us ({bf / best['us']:.2f}x) {best}", flush=True)
    with open(os.path.join(out, "gluon_mma_probe.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
