"""Time the decode kernels over their config space on the GPU (CUDA-graph replay), to shape the tuned spaces.
python scripts/gemv_sweep.py OUT_DIR [M ...]   (M = 1: the GEMV kernel; M > 1: _dq_mm_kernel)
KERNEL=mma sweeps _mma_kernel instead (any M), beside bf16 F.linear and the auto path.
SHAPES="8192x28672,4096x14336" (K x N) limits the shapes."""
import csv
import itertools
import os
import sys

import torch

from ttha.kernels.timing import graph_us, rotating
from ttha.kernels.dequant_linear import dequant_linear_triton
from ttha.quant import dequantize, quantize

out = sys.argv[1] if len(sys.argv) > 1 else "."
ms = [int(a) for a in sys.argv[2:]] or [1]
MMA = os.environ.get("KERNEL") == "mma"


def mma_configs(m, k, n, bits):
    ng = k // 128
    for (bn, warps), split, stages in itertools.product([(64, 4), (128, 8), (128, 4)], [1, 2, 4, 8],
                                                        [int(v) for v in os.environ.get("STAGES", "4").split(",")]):
        if ng % split or not 66 <= -(-n // bn) * split <= 132 * 8:
            continue
        yield {"BN": bn, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def configs(m, k, n, bits):
    kw, wpg, pw = k * bits // 32, 128 // (32 // bits), 32 // bits
    if m == 1:
        for (bn, warps), bkw, split in itertools.product(
                [(32, 2), (64, 4), (128, 4), (256, 8)], [wpg, 32, 64, 128, 256], [1, 2, 4, 8, 16]):
            if kw % (split * bkw) or bkw % wpg or bn * bkw > 64 * 32 * warps:
                continue
            if -(-n // bn) * split < 132 or -(-n // bn) * split > 132 * 8:
                continue
            yield {"BN": bn, "BKW": bkw, "SPLIT_K": split, "num_warps": warps}
        return
    dot = m > 4
    for (bn, warps), bkw, split, stages in itertools.product(
            [(16, 4), (32, 4), (64, 4), (128, 4), (128, 8)] if dot else [(8, 4), (16, 4), (32, 4)], [8, 16, 32, 64],
            [1, 2, 4, 8], [3] if dot else [1]):
        if dot and bn * bkw * pw > 64 * 256 * warps // 4:
            continue
        if not dot and (m * bn * bkw * pw > 64 * 32 * warps or bkw * pw < 128):
            continue
        if -(-n // bn) * split < 132 or -(-n // bn) * split > 132 * 8:
            continue
        yield {"BM": 16 if dot else m, "BN": bn, "BKW": bkw, "SPLIT_K": split, "USE_DOT": dot, "num_warps": warps,
               "num_stages": stages}


shapes = [(4096, 14336), (14336, 4096), (8192, 28672)]
if os.environ.get("SHAPES"):
    shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ["SHAPES"].split(",")]
rows = []
for m in ms:
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") / k**0.5
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for bits in (4, 2):
            q = quantize(w, bits, 128)
            qs = rotating(lambda: quantize(w, bits, 128), q.nbytes)
            best = None
            path = "gemv" if m == 1 else "fused"
            space = configs(m, k, n, bits)
            if MMA:
                path, space = "mma", mma_configs(m, k, n, bits)
                wb = rotating(lambda: w.to(torch.bfloat16), n * k * 2)
                tb = graph_us(lambda w_: torch.nn.functional.linear(x, w_), wb)
                ta = graph_us(lambda q_: dequant_linear_triton(x, q_), qs)
                print(f"M{m} K{k} N{n} int{bits}: bf16 {tb:.1f} us, auto path {ta:.1f} us ({tb / ta:.2f}x)", flush=True)
                rows.append(dict(M=m, K=k, N=n, bits=bits, cfg="bf16", us=tb, GBps=n * k * 2 / (tb * 1e3)))
                rows.append(dict(M=m, K=k, N=n, bits=bits, cfg="auto", us=ta, GBps=q.nbytes / (ta * 1e3)))
                del wb
            for cfg in space:
                try:
                    t = graph_us(lambda q_: dequant_linear_triton(x, q_, config=cfg, path=path), qs)
                except Exception as exc:
                    print("fail", cfg, str(exc)[:200])
                    continue
                gbs = q.nbytes / (t * 1e-6) / 1e9
                rows.append(dict(M=m, K=k, N=n, bits=bits, cfg=str(cfg), us=t, GBps=gbs))
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best and MMA:  # the best config's error against the fp32 product of the dequantized weight
                y = dequant_linear_triton(x, q, config=best[1], path="mma").float()
                ref = x.float() @ dequantize(q).T
                print(f"  relerr {float((y - ref).norm() / ref.norm()):.2e}")
            if best:
                ratio = f" {tb / best[0]:.2f}x bf16" if MMA else ""
                print(f"M{m} K{k} N{n} int{bits}: best {best[0]:.1f} us{ratio} {q.nbytes / best[0] / 1e3:.0f} GB/s {best[1]}",
                      flush=True)
            del qs
with open(f"{out}/{'mma' if MMA else 'gemv'}_sweep.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
