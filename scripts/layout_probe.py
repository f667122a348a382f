"""What limits the GEMV's bandwidth at M = 1? Times, from CUDA graphs on the GPU, per config of a short list:
- stream_words / stream_rows / stream_tiled: a kernel that only loads the GEMV's tiles and XORs them: the
  words alone, the words with their (scale, min) in the QuantizedWeight layout (row-major: a [BN, BKW] tile
  is BN pieces of BKW * 4 bytes), or both tile-contiguous (each tile one block of memory): the ceilings;
- gemv: _gemv_kernel alone (x's pairs made once, outside the graph); chain: the whole decode chain (x-prep,
  GEMV, split-K reduction, programmatic dependent launch), as dequant_linear runs it under a graph;
- variant_*: the GEMV's body with its (scale, min) read as two [N, NG] fp16 arrays (params0, QuantizedWeight's),
  as one transposed [NG, N] array of half pairs (params_t), or not at all (params_none: scale 1, min 0,
  timing only); _first: each group's word sums added before scaling;
- torch: a read-only reduction over the packed words, and bf16 F.linear.
The probe's own kernels (all but gemv and chain) read the row-major layout of that version (ttha.quant.row_major);
the weight is now stored in tiles (ttha.quant), which is what gemv and chain read.
python scripts/layout_probe.py OUT_DIR   (SHAPES="8192x28672" K x N, BITS="4,2"; kernels/BENCH_H100.md, ninth
version, has what it found)"""
import csv
import os
import sys

import torch
import triton
import triton.language as tl

from ttha.kernels.bench import copy_bandwidth
from ttha.kernels.timing import graph_us, rotating
from ttha.kernels.dequant_linear import _gemv_kernel, _word_dot, _x_pairs_kernel, dequant_linear_triton
from ttha.quant import quantize, row_major

PARAMS = {"params0": 0, "params_t": 1, "params_none": 2}
# (BN, BKW, SPLIT_K, warps): the best of a wider H100 sweep at 8192x28672, both bit widths
CONFIGS = [(64, 64, 2, 4), (64, 64, 1, 4), (128, 32, 4, 4), (64, 32, 1, 4), (64, 32, 2, 2), (128, 32, 2, 4),
           (128, 32, 4, 8), (64, 32, 2, 4), (128, 32, 2, 8), (128, 16, 4, 4), (128, 64, 1, 8), (256, 32, 2, 8),
           (64, 64, 2, 8), (32, 64, 2, 2), (64, 128, 1, 8)]


@triton.jit
def _stream(w_ptr, s_ptr, m_ptr, o_ptr, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
            BKW: tl.constexpr, SPLIT_K: tl.constexpr, TILED: tl.constexpr, SCALES: tl.constexpr):
    """Loads what the GEMV loads (SCALES: the (scale, min) too) and XORs / sums it into one value a program."""
    PW: tl.constexpr = 32 // BITS
    GT: tl.constexpr = BKW // (GROUP // PW)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BN)
    rows = (pid_n * BN + r).to(tl.int64)
    per_split = KW // SPLIT_K
    acc = tl.zeros((BN, BKW), dtype=tl.int32)
    accs = tl.zeros((BN, GT), dtype=tl.float32)
    for kw0 in range(pid_k * per_split, pid_k * per_split + per_split, BKW):
        if TILED:
            t = (pid_n * (KW // BKW) + kw0 // BKW).to(tl.int64)
            words = tl.load(w_ptr + t * (BN * BKW) + r[:, None] * BKW + tl.arange(0, BKW)[None, :])
            so = t * (BN * GT) + r[:, None] * GT + tl.arange(0, GT)[None, :]
        else:
            words = tl.load(w_ptr + rows[:, None] * KW + kw0 + tl.arange(0, BKW)[None, :])
            so = rows[:, None] * NG + (kw0 * PW) // GROUP + tl.arange(0, GT)[None, :]
        acc ^= words
        if SCALES:
            accs += tl.load(s_ptr + so).to(tl.float32) + tl.load(m_ptr + so).to(tl.float32)
    out = tl.sum(tl.sum(acc, axis=1), axis=0) + tl.sum(tl.sum(accs, axis=1), axis=0).to(tl.int32)
    tl.store(o_ptr + pid_n * SPLIT_K + pid_k, out)


@triton.jit
def _gemv_variant(xp_ptr, xg_ptr, w_ptr, s_ptr, m_ptr, p_ptr, N, KW, NG,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
                  SPLIT_K: tl.constexpr, PARAMS: tl.constexpr, FIRST: tl.constexpr, ASM: tl.constexpr = True):
    """_gemv_kernel's body (M = 1, no bias, N a multiple of BN, fp32 partials p[pid_k]) with its (scale, min)
    as PARAMS: 0 two [N, NG] fp16 arrays, 1 one [NG, N] int32 of (scale, min) half pairs at s_ptr, 2 none."""
    PW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // PW
    GT: tl.constexpr = BKW // WPG
    pid_n, pid_k = tl.program_id(0), tl.program_id(2)
    rn64 = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    per_split = KW // SPLIT_K
    kw_lo = pid_k * per_split
    acc = tl.zeros((BN, GT, WPG), dtype=tl.float32)
    acc_g = tl.zeros((BN, GT), dtype=tl.float32)
    for kw0 in range(kw_lo, kw_lo + per_split, BKW):
        kw = kw0 + tl.arange(0, BKW)
        words = tl.load(w_ptr + rn64[:, None] * KW + kw[None, :])
        g = (kw0 * PW) // GROUP + tl.arange(0, GT)
        if PARAMS == 0:
            sc = tl.load(s_ptr + rn64[:, None] * NG + g[None, :]).to(tl.float32)
            mn = tl.load(m_ptr + rn64[:, None] * NG + g[None, :]).to(tl.float32)
        elif PARAMS == 1:
            sm = tl.load(s_ptr + g[None, :].to(tl.int64) * N + rn64[:, None])
            sc = (sm & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            mn = ((sm >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            sc = tl.full((BN, GT), 1.0, tl.float32)
            mn = tl.zeros((BN, GT), dtype=tl.float32)
        sc *= tl.load(xg_ptr + NG + g)[None, :]
        dots = tl.reshape(_word_dot(words, xp_ptr, KW, kw, BITS, ASM), (BN, GT, WPG))
        if FIRST:
            acc_g += tl.sum(dots, axis=2) * sc
        else:
            acc += dots * sc[:, :, None]
        acc_g += mn * tl.load(xg_ptr + g)[None, :]
    tl.store(p_ptr + pid_k.to(tl.int64) * N + rn64, tl.sum(tl.sum(acc, axis=2) + acc_g, axis=1))


def tiled(a: torch.Tensor, bn: int, bc: int) -> torch.Tensor:
    """[N, C] -> each [bn, bc] tile one contiguous block, tiles in (row block, column block) order."""
    n, c = a.shape
    return a.reshape(n // bn, bn, c // bc, bc).permute(0, 2, 1, 3).contiguous()


def half_pairs_t(q) -> torch.Tensor:
    """[NG, N] int32: the scale's fp16 bits low, the min's high, groups major (as stored)."""
    s = q.scales.view(torch.int16).to(torch.int32) & 0xFFFF
    return (s | (q.mins.view(torch.int16).to(torch.int32) << 16)).contiguous()


def probe(k: int, n: int, bits: int, x, w, tb: float, copy_gbs: float, rows: list) -> None:
    pw = 32 // bits
    kw, ng, wpg = k // pw, k // 128, 128 // pw
    qs = rotating(lambda: quantize(w, bits, 128), n * k * bits // 8)
    nbytes = qs[0].nbytes
    tr = graph_us(lambda q_: q_.packed.sum(), qs)
    # the probe's own kernels read the row-major layout of the ninth version; the shipped one reads the tiles
    legacy = [row_major(q_) for q_ in qs]
    stored = [(q_.packed, q_.scales, q_.mins) for q_ in qs]
    rows.append(dict(K=k, N=n, bits=bits, kind="torch_sum_words", cfg="", us=tr, GBps=n * kw * 4 / tr / 1e3))
    xp = torch.empty((1, pw // 2 * kw), dtype=torch.int32, device="cuda")
    xg = torch.empty((1, 2 * ng), dtype=torch.float32, device="cuda")
    _x_pairs_kernel[(kw // 64, 1)](x, xp, xg, None, kw, ng, 0, x.stride(0), BITS=bits, GROUP=128, BKW=64)
    pairs = [half_pairs_t(q_) for q_ in qs]
    best = {}
    for bn, bkw, split, warps in CONFIGS:
        if bkw % wpg or kw % (split * bkw) or n % bn:
            continue
        gt = bkw // wpg
        tq = [(tiled(w_, bn, bkw), tiled(s_, bn, gt), tiled(m_, bn, gt)) for w_, s_, m_ in legacy]
        o = torch.empty(n // bn * split, dtype=torch.int32, device="cuda")
        p = torch.empty((split, 1, n), dtype=torch.float32, device="cuda")
        y = torch.empty((1, n), dtype=torch.bfloat16, device="cuda")
        cfg = f"BN{bn} BKW{bkw} S{split} W{warps}"
        g2, g3 = (n // bn, split), (n // bn, 1, split)
        meta = dict(BITS=bits, GROUP=128, BN=bn, BKW=bkw, SPLIT_K=split, num_warps=warps)
        cases = {
            "stream_words": (lambda t_: _stream[g2](*t_, o, kw, ng, TILED=False, SCALES=False, **meta), legacy),
            "stream_rows": (lambda t_: _stream[g2](*t_, o, kw, ng, TILED=False, SCALES=True, **meta), legacy),
            "stream_tiled": (lambda t_: _stream[g2](*t_, o, kw, ng, TILED=True, SCALES=True, **meta), tq),
            "gemv": (lambda t_: _gemv_kernel[g3](xp, xg, *t_, x, y, p, 1, n, kw, ng, HAS_BIAS=False, ASM=True,
                                                 **meta), stored),
            "chain": (lambda q_: dequant_linear_triton(x, q_, path="gemv", config=dict(
                BN=bn, BKW=bkw, SPLIT_K=split, num_warps=warps)), qs),
        }
        for name, params in PARAMS.items():
            items = [(w_, pr, pr) for (w_, _, _), pr in zip(legacy, pairs)] if name == "params_t" else legacy
            for first in (False, True):
                cases[f"variant_{name}{'_first' if first else ''}"] = (
                    lambda t_, params=params, first=first: _gemv_variant[g3](xp, xg, *t_, p, n, kw, ng, PARAMS=params,
                                                                             FIRST=first, **meta), items)
        for kind, (fn, items) in cases.items():
            t = graph_us(fn, items)
            rows.append(dict(K=k, N=n, bits=bits, kind=kind, cfg=cfg, us=t, GBps=nbytes / t / 1e3))
            best[kind] = min(best.get(kind, (t, cfg)), (t, cfg))
        # the variants that read the real (scale, min) must give the kernel's partials
        _gemv_kernel[g3](xp, xg, *stored[0], x, y, p, 1, n, kw, ng, HAS_BIAS=False, ASM=True, **meta)
        ref = p.clone() if split > 1 else y.float()
        for params, sp in ((0, legacy[0][1:]), (1, (pairs[0],) * 2)):
            for first in (False, True):
                _gemv_variant[g3](xp, xg, legacy[0][0], *sp, p, n, kw, ng, PARAMS=params, FIRST=first, **meta)
                err = float((p - ref).abs().max() / ref.abs().max())
                if err > (1e-5 if split > 1 else 1e-2):
                    raise SystemExit(f"variant PARAMS={params} FIRST={first} {cfg} disagrees with the kernel: {err:.1e}")
    print(f"  int{bits}: torch sum of words {tr:.1f} us, {n * kw * 4 / tr / 1e3 / copy_gbs:.1%} of copy")
    for kind, (t, cfg) in best.items():
        print(f"  int{bits} {kind:>28}: {t:6.1f} us {nbytes / t / 1e3 / copy_gbs:6.1%} of copy  {tb / t:.2f}x bf16  "
              f"{cfg}", flush=True)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("SHAPES", "8192x28672").split(",")]
    rows = []
    copy_gbs = copy_bandwidth()
    print(f"copy {copy_gbs:.0f} GB/s", flush=True)
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") / k**0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wb = rotating(lambda: w.to(torch.bfloat16), n * k * 2)
        tb = graph_us(lambda w_: torch.nn.functional.linear(x, w_), wb)
        rows.append(dict(K=k, N=n, bits=16, kind="bf16_linear", cfg="", us=tb, GBps=n * k * 2 / tb / 1e3))
        print(f"K{k} N{n} bf16 F.linear {tb:.1f} us {n * k * 2 / tb / 1e3 / copy_gbs:.1%} of copy", flush=True)
        del wb
        for bits in [int(b) for b in os.environ.get("BITS", "4,2").split(",")]:
            probe(k, n, bits, x, w, tb, copy_gbs, rows)
    with open(os.path.join(out, "layout_probe.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
