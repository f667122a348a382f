"""Kernel benchmarks on a CUDA GPU: `python -m ttha.kernels.bench [--out DIR] [--quick]`.

Measures, in one run: device copy bandwidth (the roofline), fused dequant-linear (int4, int2,
group 128) vs torch bf16 F.linear (cuBLAS) vs FP8 torch._scaled_mm (row-wise scales, x quantized
in the timed call) [vs gemlite when installed], NVML energy per call over >= 2 s saturated loops,
where a captured decode call's GPU time goes (each kernel's time, torch.profiler), the fused router vs
the torch sequence, paced single-call rates (launch overhead), and one MoE layer's decode step (bench_moe.py).
Writes bench.csv and bench.json to --out (default $OUT or outputs/kernel_bench) and prints a table.
Each row prints as it is measured; Ctrl-C or SIGTERM stops the run and still writes the rows measured so far.
--ms and --shapes narrow the linear and profile tables.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import signal
import time

import torch
import torch.nn.functional as F

from .bench_moe import fmt_moe, run_moe
from .tuning import (bench_us, capture, copy_bandwidth, energy_per_call_j, graph_us, kernel_us_per_call,
                     paced_calls_per_s, replay_us, rotating, timing_graph)

SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672)]  # K x N
MS = [1, 4, 16, 64, 256, 4096]
ROUTER = [(t, e, k) for t in (4096, 16384, 65536) for e in (8, 64, 128) for k in (1, 2, 8)]


def _graph_or_none(fn, items: list) -> float | None:
    """graph_us for a peer's kernels, None where they cannot be captured."""
    try:
        return graph_us(fn, items)
    except Exception as exc:
        print(f"no CUDA graph: {str(exc)[:120]}")
        return None


def cycler(items):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def fp8_weight(w: torch.Tensor):
    scale = (w.float().abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(1, -1).contiguous()


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Row-wise scaled e4m3 linear: x quantized per row on the fly, weight per output channel."""
    m = x.shape[0]
    pad = (-m) % 16
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    xs = (x.float().abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
    x8 = (x.float() / xs).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=w_scale, out_dtype=torch.bfloat16)
    return y[:m]


def _gemlite_layer(w: torch.Tensor, bits: int, group: int):
    try:
        from gemlite.helper import A16Wn  # gemlite 0.6 helper API
    except Exception:
        return None
    try:
        from .quant import quantize, row_major, unpack_codes

        qw = quantize(w, bits, group)
        codes = unpack_codes(qw).to(torch.uint8)
        _, scales, mins = row_major(qw)  # gemlite takes [N, NG]
        zeros = (-mins.float() / scales.float()).half()
        return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(codes, scales, zeros, bits, group, bias=None)
    except Exception as exc:  # peer column is optional
        print(f"gemlite unavailable: {exc}")
        return None


class Rows(list):
    """The bench's rows, each printed as it is measured: a long run shows its progress, and an interrupted one
    has already shown what it measured."""

    def append(self, row: dict) -> None:
        super().append(row)
        where = " ".join(f"{k}={row[k]}" for k in ("K", "N", "M", "T", "E", "k") if k in row)
        nums = " ".join(f"{k} {row[k]:.1f}" for k in ("us", "torch_us", "graph_us", "torch_graph_us", "energy_mj",
                                                        "paced_calls_per_s") if isinstance(row.get(k), float))
        print(f"  {row.get('table', 'linear')} {where} {row['kernel']}: {nums}", flush=True)


def run_linear(rows: list, copy_gbs: float, quick: bool, energy: bool, ms: list[int] | None = None,
               shapes: list[tuple[int, int]] | None = None) -> None:
    from . import dequant_linear, dequant_linear_triton
    from .dequant_linear import GEMV_M, LARGE_M
    from .quant import dequantize, quantize

    for k, n in shapes or (SHAPES[:1] if quick else SHAPES):
        torch.manual_seed(0)
        w = (torch.randn(n, k, device="cuda") / k**0.5)
        wb = w.to(torch.bfloat16)
        ws = rotating(lambda: wb.clone(), wb.numel() * 2)
        q = {b: quantize(w, b, 128) for b in (4, 2)}
        qs = {b: rotating(lambda b=b: quantize(w, b, 128), q[b].nbytes) for b in (4, 2)}
        w8, s8 = fp8_weight(w)
        w8s = rotating(lambda: (w8.clone(), s8.clone()), w8.numel())
        gems = {b: [g for g in rotating(lambda b=b: _gemlite_layer(w, b, 128), q[b].nbytes) if g is not None]
                for b in (4, 2)}  # the peer's layers (none when gemlite is not installed)
        del w
        for m in ms or (MS[:3] + MS[-1:] if quick else MS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            io = x.numel() * 2 + m * n * 2
            nw = cycler(ws)
            t_ref = bench_us(lambda: F.linear(x, nw()))
            base = dict(K=k, N=n, M=m, torch_us=t_ref)
            decode = m < LARGE_M  # also timed from a CUDA graph (GPU time without launch overhead)
            g_ref = graph_us(lambda w_: F.linear(x, w_), ws) if decode else None
            base.update(torch_graph_us=g_ref)
            rows.append(dict(base, kernel="bf16_linear", us=t_ref, graph_us=g_ref, bytes=wb.numel() * 2 + io))
            for b in (4, 2):
                nq = cycler(qs[b])
                y = dequant_linear(x, q[b])
                ref = F.linear(x.float(), dequantize(q[b]))
                relerr = float((y.float() - ref).norm() / ref.norm())
                t = bench_us(lambda: dequant_linear(x, nq()))
                tg = graph_us(lambda q_: dequant_linear(x, q_), qs[b]) if decode else None
                rows.append(dict(base, kernel=f"ours_int{b}_g128", us=t, graph_us=tg, bytes=q[b].nbytes + io,
                                 relerr=relerr))
                # the kernels the auto path did not pick, to place its switches on data
                others = ("fused", "mma") if m <= GEMV_M else ("fused",) if decode else ("mma", "fused")
                for other in others:
                    to = bench_us(lambda: dequant_linear_triton(x, nq(), path=other))
                    tog = graph_us(lambda q_: dequant_linear_triton(x, q_, path=other), qs[b]) if decode else None
                    rows.append(dict(base, kernel=f"{other}_int{b}_g128", us=to, graph_us=tog, bytes=q[b].nbytes + io))
                if gems[b]:
                    ngl = cycler(gems[b])
                    tl_ = bench_us(lambda: ngl()(x))
                    tlg = _graph_or_none(lambda g_: g_(x), gems[b]) if decode else None
                    rows.append(dict(base, kernel=f"gemlite_int{b}_g128", us=tl_, graph_us=tlg, bytes=q[b].nbytes + io))
            try:
                n8 = cycler(w8s)
                t8 = bench_us(lambda: fp8_linear(x, *n8()))
                rows.append(dict(base, kernel="fp8_scaled_mm", us=t8, bytes=w8.numel() + n * 4 + io))
            except Exception as exc:
                print(f"fp8 M={m}: {exc}")
            del x
        if energy and (k, n) == SHAPES[-1]:
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nw, n4, n2, n8 = cycler(ws), cycler(qs[4]), cycler(qs[2]), cycler(w8s)
                calls = [("bf16_linear", lambda: F.linear(x, nw())),
                         ("ours_int4_g128", lambda: dequant_linear(x, n4())),
                         ("ours_int2_g128", lambda: dequant_linear(x, n2())),
                         ("fp8_scaled_mm", lambda: fp8_linear(x, *n8()))]
                calls += [(f"gemlite_int{b}_g128", lambda c=cycler(gems[b]): c()(x)) for b in (4, 2) if gems[b]]
                for name, fn in calls:
                    j, watts = energy_per_call_j(fn)
                    rows.append(dict(K=k, N=n, M=m, kernel=name, energy_mj=j * 1e3, avg_w=watts, table="energy"))
                # replayed from CUDA graphs (the decode chains auto picks under capture), bf16 the same way
                for name, fn, items in (("bf16_linear_graph", lambda w_: F.linear(x, w_), ws),
                                        ("ours_int4_g128_graph", lambda q_: dequant_linear(x, q_), qs[4]),
                                        ("ours_int2_g128_graph", lambda q_: dequant_linear(x, q_), qs[2])):
                    j, watts = energy_per_call_j(capture(fn, items).replay)
                    rows.append(dict(K=k, N=n, M=m, kernel=name, energy_mj=j * 1e3 / len(items), avg_w=watts,
                                     table="energy"))
        del ws, qs, w8s, wb, gems
        torch.cuda.empty_cache()


def run_profile(rows: list, quick: bool, ms: list[int] | None = None,
                shapes: list[tuple[int, int]] | None = None) -> None:
    """Where a captured decode call's GPU time goes: replay time per call beside each kernel's own time (the
    x-prep kernel, the main kernel, the split-K reduction), for ours and bf16 F.linear. The replay time over the
    main kernel's is what launches, waits and the first and last waves cost."""
    from . import dequant_linear
    from .dequant_linear import LARGE_M
    from .quant import quantize

    for k, n in shapes or (SHAPES[:1] if quick else SHAPES):
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") / k**0.5
        ws = rotating(lambda: w.to(torch.bfloat16), n * k * 2)
        qs = {b: rotating(lambda b=b: quantize(w, b, 128), n * k * b // 8) for b in (4, 2)}  # codes' bytes
        for m in [m for m in (ms or (1, 16)) if m < LARGE_M]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for name, fn, items in (("bf16_linear", lambda w_: F.linear(x, w_), ws),
                                    ("ours_int4_g128", lambda q_: dequant_linear(x, q_), qs[4]),
                                    ("ours_int2_g128", lambda q_: dequant_linear(x, q_), qs[2])):
                graph, calls = timing_graph(fn, items)
                per_call = replay_us(graph, calls)
                parts = kernel_us_per_call(graph, calls)
                rows.append(dict(table="profile", K=k, N=n, M=m, kernel=name, graph_us=per_call, kernels=parts,
                                 gap_us=per_call - max(parts.values())))
                del graph
        del ws, qs
        torch.cuda.empty_cache()


def torch_router(logits, bias, k):
    p = torch.softmax(logits + bias, dim=-1)
    w, i = p.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def run_router(rows: list, copy_gbs: float, quick: bool) -> None:
    from . import topk_router

    for t, e, k in (ROUTER[::4] if quick else ROUTER):
        logits = torch.randn(t, e, device="cuda")
        bias = torch.randn(e, device="cuda") * 0.1
        w, i = topk_router(logits, bias, k)
        wr, ir = torch_router(logits, bias, k)
        agree = float((i == ir).float().mean())
        t_ref = bench_us(lambda: torch_router(logits, bias, k))
        t_ours = bench_us(lambda: topk_router(logits, bias, k))
        # eager times of a few-microsecond kernel measure the host's launch path, which varies from run to
        # run; GPU time from graph replay beside them
        g_ref = graph_us(lambda _: torch_router(logits, bias, k), [None])
        g_ours = graph_us(lambda _: topk_router(logits, bias, k), [None])
        nbytes = t * e * 4 + t * k * 12
        rows.append(dict(table="router", T=t, E=e, k=k, kernel="ours_topk_router", us=t_ours, torch_us=t_ref,
                         ratio=t_ref / t_ours, GBps=nbytes / (t_ours * 1e-6) / 1e9,
                         bw_share=nbytes / (t_ours * 1e-6) / 1e9 / copy_gbs, index_agreement=agree,
                         graph_us=g_ours, torch_graph_us=g_ref, graph_ratio=g_ref / g_ours))


def run_launch(rows: list) -> None:
    from . import dequant_linear, topk_router
    from .quant import quantize

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda") / 64
    q4, q2 = quantize(w, 4, 128), quantize(w, 2, 128)
    wb = w.to(torch.bfloat16)
    logits, bias = torch.randn(4096, 64, device="cuda"), torch.zeros(64, device="cuda")
    for name, fn in [("ours_int4_g128 M1 4096x14336", lambda: dequant_linear(x, q4)),
                     ("ours_int2_g128 M1 4096x14336", lambda: dequant_linear(x, q2)),
                     ("bf16_linear M1 4096x14336", lambda: F.linear(x, wb)),
                     ("ours_topk_router T4096 E64 k2", lambda: topk_router(logits, bias, 2))]:
        for _ in range(3):  # compile and tune outside the timed loop
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host_us = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        rows.append(dict(table="launch", kernel=name, paced_calls_per_s=paced_calls_per_s(fn),
                         host_us_per_call=host_us))


def fmt_table(rows: list) -> str:
    out = []
    lin = [r for r in rows if "table" not in r]
    if lin:
        out.append(f"{'K x N':>12} {'M':>5} {'kernel':>20} {'us':>9} {'torch us':>9} {'ratio':>6} {'GB/s':>7} "
                   f"{'%copy':>6} {'relerr':>8} {'graph us':>9} {'g.ratio':>7} {'g.%copy':>7}")
        for r in lin:
            g = r.get("graph_us")
            graph = (f" {g:9.1f} {r.get('graph_ratio', float('nan')):7.2f} "
                     f"{100 * r['graph_bw_share']:6.1f}%") if g else ""
            out.append(f"{r['K']:>5}x{r['N']:<6} {r['M']:>5} {r['kernel']:>20} {r['us']:9.1f} {r['torch_us']:9.1f} "
                       f"{r['ratio']:6.2f} {r['GBps']:7.0f} {100 * r['bw_share']:5.1f}% "
                       f"{r.get('relerr', float('nan')):8.1e}{graph}")
    en = [r for r in rows if r.get("table") == "energy"]
    if en:
        out.append(f"\nenergy per call (NVML, >=2 s saturated loop)\n{'K x N':>12} {'M':>3} {'kernel':>16} "
                   f"{'mJ/call':>9} {'avg W':>7}")
        for r in en:
            out.append(f"{r['K']:>5}x{r['N']:<6} {r['M']:>3} {r['kernel']:>16} {r['energy_mj']:9.3f} {r['avg_w']:7.0f}")
    ro = [r for r in rows if r.get("table") == "router"]
    if ro:
        out.append(f"\nrouter\n{'T':>6} {'E':>4} {'k':>2} {'ours us':>8} {'torch us':>9} {'ratio':>6} {'GB/s':>6} "
                   f"{'idx agree':>9} {'graph us':>9} {'torch g.us':>10} {'g.ratio':>7}")
        for r in ro:
            out.append(f"{r['T']:>6} {r['E']:>4} {r['k']:>2} {r['us']:8.1f} {r['torch_us']:9.1f} {r['ratio']:6.2f} "
                       f"{r['GBps']:6.0f} {r['index_agreement']:9.4f} {r['graph_us']:9.1f} {r['torch_graph_us']:10.1f} "
                       f"{r['graph_ratio']:7.2f}")
    pr = [r for r in rows if r.get("table") == "profile"]
    if pr:
        out.append(f"\ncaptured decode calls: GPU us per call, and each kernel's (torch.profiler)\n{'K x N':>12} {'M':>3} "
                   f"{'kernel':>16} {'graph us':>9} {'gap us':>7}  kernels")
        for r in pr:
            parts = ", ".join(f"{name[:28]} {us:.1f}" for name, us in r["kernels"].items())
            out.append(f"{r['K']:>5}x{r['N']:<6} {r['M']:>3} {r['kernel']:>16} {r['graph_us']:9.1f} {r['gap_us']:7.1f}  "
                       f"{parts}")
    la = [r for r in rows if r.get("table") == "launch"]
    if la:
        out.append("\npaced single calls (sync after each)")
        for r in la:
            out.append(f"{r['kernel']:>32} {r['paced_calls_per_s']:8.0f} calls/s  host {r['host_us_per_call']:.1f} us/call")
    return "\n".join(out + fmt_moe(rows))


def _ms(text: str) -> list[int]:
    """--ms: comma-separated positive M values, parsed once, before any GPU work."""
    try:
        ms = [int(m) for m in text.split(",") if m]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ms={text!r}: expected comma-separated integers, e.g. 1,16") from None
    if any(m < 1 for m in ms):
        raise argparse.ArgumentTypeError(f"--ms={text!r}: every M must be at least 1")
    return ms


def _shapes(text: str) -> list[tuple[int, int]]:
    """--shapes: comma-separated KxN weight shapes, parsed once, before any GPU work."""
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = None
    if shapes is None or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes={text!r}: expected comma-separated KxN, e.g. 8192x28672")
    return shapes


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def save(rows: list, meta: dict, copy_gbs: float, out: str) -> None:
    """bench.json and bench.csv with each row's ratios and bandwidth shares."""
    for r in rows:
        if "us" in r and "bytes" in r:
            r["ratio"] = r["torch_us"] / r["us"]  # > 1: faster than bf16 F.linear
            if r.get("graph_us") and r.get("torch_graph_us"):
                r["graph_ratio"] = r["torch_graph_us"] / r["graph_us"]
            r["GBps"] = r["bytes"] / (r["us"] * 1e-6) / 1e9
            r["bw_share"] = r["GBps"] / copy_gbs
            if r.get("graph_us"):
                r["graph_bw_share"] = r["bytes"] / (r["graph_us"] * 1e-6) / 1e9 / copy_gbs
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:  # csv quotes the profile's kernel dicts
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "outputs/kernel_bench")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer M and router sizes")
    ap.add_argument("--only", default="linear,energy,profile,router,launch,moe")
    ap.add_argument("--ms", default=[], type=_ms,
                    help="comma-separated M values for the linear and profile tables (default: all / 1,16)")
    ap.add_argument("--shapes", default=[], type=_shapes,
                    help="comma-separated KxN weight shapes for the linear and profile tables (default: all three)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    copy_gbs = copy_bandwidth()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, copy_GBps=copy_gbs)
    import triton

    meta["triton"] = triton.__version__
    print(json.dumps(meta), flush=True)
    rows = Rows()
    sections = [("linear", lambda: run_linear(rows, copy_gbs, args.quick, energy="energy" in only,
                                                 ms=args.ms, shapes=args.shapes)),
                ("profile", lambda: run_profile(rows, args.quick, args.ms, args.shapes)),
                ("router", lambda: run_router(rows, copy_gbs, args.quick)), ("launch", lambda: run_launch(rows)),
                ("moe", lambda: run_moe(rows, copy_gbs, args.quick))]
    previous = signal.signal(signal.SIGTERM, _sigterm)  # a killed bench (timeout, scheduler) saves what it has
    try:
        for name, fn in sections:
            if name in only:
                try:  # a failing section still leaves the others' numbers
                    fn()
                except Exception as exc:
                    meta.setdefault("errors", []).append(f"{name}: {exc!r}")
                    print(f"section {name} failed: {exc!r}", flush=True)
    except KeyboardInterrupt as exc:
        meta["interrupted"] = str(exc) or "KeyboardInterrupt"
    finally:
        signal.signal(signal.SIGTERM, previous)
        save(rows, meta, copy_gbs, args.out)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s on {meta['device']}")
    print(fmt_table(rows))
    if "interrupted" in meta:
        raise SystemExit(f"bench interrupted ({meta['interrupted']}): {len(rows)} rows saved to {args.out}")


if __name__ == "__main__":
    main()
