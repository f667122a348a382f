"""Grouped MoE decode: out[t] = sum_j weights[t, j] * expert_{idx[t, j]}(x[t]), experts w2 @ gelu(w1 @ x).

In decode an expert costs one read of its weights per step if it gets a token and nothing if it gets none, so
the step's cost is set by which experts the router picks and at what precision. `moe_decode_triton` reads only
the routed experts, without the host: the route plan (topk_router.RoutePlan, written on the device by the fused
router) says which token slots each expert serves, and every kernel program reads its expert's range from it and
returns at once when it is empty (_moe_kernels.py). So the whole step is captured once as a CUDA graph and
replayed whatever the routing, a bias written in place between replays included.

`GroupedExperts` holds one layer's experts stacked per precision (16-bit, int4, int2) and the map from expert
id to its stack. `moe_decode_ref` is the torch reference with the same semantics (the eager and CPU path): it
loops over the experts with tokens, reading the plan on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _moe_kernels as mk
from ._backend import interpreting, triton
from .quant import QuantizedWeight, dequantize, quantize
from .topk_router import RoutePlan

PRECISIONS = (16, 4, 2)  # stack order; _moe_kernels.PRECISION_CODES numbers them


@dataclass(eq=False)
class GroupedExperts:
    """One layer's experts stacked per precision. bits[e] (16, 4 or 2) and index[e] (its place in that stack)
    map expert e; dense = (up [E16, F, D], down [E16, D, F]) in one 16-bit dtype; quant[bits] = (up, down), each
    a QuantizedWeight whose tensors are stacked (packed [Ep, ...], scales and mins [Ep, NG, N]) and whose shape is
    one expert's (N, K); table [2, E] int32, the same map on the weights' device for the kernels."""
    bits: tuple[int, ...]
    index: tuple[int, ...]
    dense: tuple[torch.Tensor, torch.Tensor] | None
    quant: dict[int, tuple[QuantizedWeight, QuantizedWeight]]
    table: torch.Tensor
    d_model: int
    d_ff: int

    @classmethod
    def from_parts(cls, parts: list) -> "GroupedExperts":
        """Experts given as [(w1, w2), ...]: w1 [d_ff, d_model], w2 [d_model, d_ff], each a 16-bit tensor or a
        QuantizedWeight (both of one expert at one precision; one group size and one 16-bit dtype a layer)."""
        if not parts:
            raise ValueError("experts: expected at least one (w1, w2)")
        first = parts[0][0]
        d_ff, d_model = first.shape
        bits, index, stacks = [], [], {b: [] for b in PRECISIONS}
        for e, (w1, w2) in enumerate(parts):
            b = w1.bits if isinstance(w1, QuantizedWeight) else 16
            if (w2.bits if isinstance(w2, QuantizedWeight) else 16) != b:
                raise ValueError(f"experts[{e}]: w1 and w2 must have one precision")
            if tuple(w1.shape) != (d_ff, d_model) or tuple(w2.shape) != (d_model, d_ff):
                raise ValueError(f"experts[{e}]: expected w1 {(d_ff, d_model)} and w2 {(d_model, d_ff)}, got "
                                 f"{tuple(w1.shape)} and {tuple(w2.shape)}")
            if b == 16 and (w1.dtype not in (torch.bfloat16, torch.float16) or w2.dtype != w1.dtype):
                raise ValueError(f"experts[{e}]: 16-bit weights must both be bfloat16 or float16, got "
                                 f"{w1.dtype} and {w2.dtype}")
            bits.append(b)
            index.append(len(stacks[b]))
            stacks[b].append((w1, w2))
        if len({p[0].dtype for p in stacks[16]}) > 1:
            raise ValueError("experts: 16-bit experts must share one dtype")
        dense = tuple(torch.stack([p[i] for p in stacks[16]]).contiguous() for i in (0, 1)) if stacks[16] else None
        quant = {b: tuple(_stack_quant([p[i] for p in stacks[b]]) for i in (0, 1)) for b in (4, 2) if stacks[b]}
        if len({q.group_size for pair in quant.values() for q in pair}) > 1:
            raise ValueError("experts: quantized experts must share one group_size")
        device = first.packed.device if isinstance(first, QuantizedWeight) else first.device
        table = torch.tensor([[mk.PRECISION_CODES[b] for b in bits], index], dtype=torch.int32, device=device)
        return cls(tuple(bits), tuple(index), dense, quant, table, d_model, d_ff)

    @classmethod
    def from_weights(cls, experts: list, group_size: int = 64, dtype: torch.dtype = torch.bfloat16):
        """Experts from dense weights [(w1, w2, bits), ...]: bits 16 kept in `dtype`, 4 or 2 quantized
        (quant.quantize, groups of `group_size`)."""
        parts = []
        for e, (w1, w2, bits) in enumerate(experts):
            if bits not in PRECISIONS:
                raise ValueError(f"experts[{e}]: bits={bits!r}: must be one of {PRECISIONS}")
            parts.append((w1.to(dtype), w2.to(dtype)) if bits == 16 else
                         (quantize(w1, bits, group_size), quantize(w2, bits, group_size)))
        return cls.from_parts(parts)

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def group_size(self) -> int | None:
        return next((q.group_size for q, _ in self.quant.values()), None)

    @property
    def dtype(self) -> torch.dtype | None:
        """The 16-bit experts' dtype (x must have it), None without any."""
        return None if self.dense is None else self.dense[0].dtype

    @property
    def device(self) -> torch.device:
        return self.table.device

    def weight(self, e: int, side: str):
        """Expert e's w1 (side "up") or w2 ("down"): a view of its stack, a tensor or a QuantizedWeight."""
        b, i, s = self.bits[e], self.index[e], ("up", "down").index(side)
        if b == 16:
            return self.dense[s][i]
        q = self.quant[b][s]
        return QuantizedWeight(q.packed[i], q.scales[i], q.mins[i], q.bits, q.group_size, q.shape)

    def expert_bytes(self, e: int) -> int:
        """Bytes of expert e's weights: what a decode step reads for it when it gets a token."""
        ws = [self.weight(e, s) for s in ("up", "down")]
        return sum(w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size() for w in ws)

    def _map(self, fn) -> "GroupedExperts":
        quant = {b: tuple(QuantizedWeight(fn(q.packed), fn(q.scales), fn(q.mins), q.bits, q.group_size, q.shape)
                          for q in pair) for b, pair in self.quant.items()}
        dense = None if self.dense is None else tuple(fn(w) for w in self.dense)
        return GroupedExperts(self.bits, self.index, dense, quant, fn(self.table), self.d_model, self.d_ff)

    def to(self, device) -> "GroupedExperts":
        return self._map(lambda t: t.to(device))

    def clone(self) -> "GroupedExperts":
        return self._map(torch.Tensor.clone)

    def kernel_args(self, side: str) -> tuple:
        """(w16, p4, s4, m4, p2, s2, m2) of the up or down projections for _moe_kernel; the table stands in for
        an absent precision (its branch compiles out)."""
        s = ("up", "down").index(side)
        out = [self.dense[s] if self.dense is not None else self.table]
        for b in (4, 2):
            q = self.quant[b][s] if b in self.quant else None
            out += [q.packed, q.scales, q.mins] if q is not None else [self.table] * 3
        return tuple(out)


def _stack_quant(qs: list[QuantizedWeight]) -> QuantizedWeight:
    q = qs[0]
    return QuantizedWeight(torch.stack([w.packed for w in qs]).contiguous(), torch.stack([w.scales for w in qs]),
                           torch.stack([w.mins for w in qs]), q.bits, q.group_size, q.shape)


def kernel_supports(experts: GroupedExperts) -> bool:
    """The grouped kernels take the layer: 4/2-bit groups of whole 4-word blocks (as mma.mma_ok: not 2-bit in
    groups of 32) and at most 128 values, d_model and d_ff multiples of 16 (the smallest MMA tile)."""
    g = experts.group_size
    return (experts.d_model % 16 == 0 and experts.d_ff % 16 == 0
            and all((g * b // 32) % 4 == 0 and g <= 128 for b in experts.quant))


def check_args(x, weights, plan, experts) -> None:
    """ValueError naming the argument for anything the kernels and the reference cannot take."""
    if not isinstance(experts, GroupedExperts):
        raise ValueError(f"experts: expected a GroupedExperts, got {type(experts).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != experts.d_model:
        raise ValueError(f"x: expected [T, {experts.d_model}], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.bfloat16, torch.float16) or (experts.dtype not in (None, x.dtype)):
        raise ValueError(f"x: dtype must be bfloat16 or float16 (the 16-bit experts' {experts.dtype}), got {x.dtype}")
    if x.device != experts.device:
        raise ValueError(f"x: on {x.device}, experts on {experts.device}")
    t = x.shape[0]
    if (not isinstance(weights, torch.Tensor) or weights.dim() != 2 or weights.shape[0] != t or weights.shape[1] < 1
            or not weights.dtype.is_floating_point or weights.device != x.device):
        raise ValueError(f"weights: expected floating [T={t}, k] on {x.device}, got "
                         f"{getattr(weights, 'dtype', None)} {tuple(getattr(weights, 'shape', ()))}")
    if not isinstance(plan, RoutePlan):
        raise ValueError(f"plan: expected a RoutePlan, got {type(plan).__name__}")
    n, s = len(experts), t * weights.shape[1]
    for name, size in (("counts", n), ("offsets", n + 1), ("order", s)):
        v = getattr(plan, name)
        if tuple(v.shape) != (size,) or v.dtype != torch.int32 or v.device != x.device:
            raise ValueError(f"plan.{name}: expected int32 ({size},) on {x.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")


def moe_decode_ref(x: torch.Tensor, weights: torch.Tensor, plan: RoutePlan, experts: GroupedExperts) -> torch.Tensor:
    """Torch reference: for each expert with tokens (read from the plan on the host), its slots' rows through
    w2 @ gelu(w1 @ x) in fp32, h rounded to x's dtype (as the kernels store it); then out[t] = sum_j
    weights[t, j] * y[t * k + j] in fp32, in x's dtype."""
    check_args(x, weights, plan, experts)
    t, d = x.shape
    k = weights.shape[1]
    y = torch.zeros((t * k, d), dtype=torch.float32, device=x.device)
    offsets = plan.offsets.tolist()
    for e in range(len(experts)):
        if offsets[e] == offsets[e + 1]:
            continue
        slots = plan.order[offsets[e]:offsets[e + 1]].long()
        w1, w2 = (_dense(experts.weight(e, side)) for side in ("up", "down"))
        h = F.gelu(x[slots // k].float() @ w1.T).to(x.dtype)
        y[slots] = h.float() @ w2.T
    return (weights.float().unsqueeze(-1) * y.view(t, k, d)).sum(1).to(x.dtype)


def _dense(w) -> torch.Tensor:
    return dequantize(w) if isinstance(w, QuantizedWeight) else w.float()


def _launch(tuned, args: tuple, meta: dict, shape: dict, grid, config: dict | None) -> int:
    """_moe_kernel with `config` ({BN, BK, SPLIT_K, num_warps, num_stages}), else autotuned (`tuned`; small fixed
    tiles on the interpreter, which is slow); shape: its N and K. Returns the split it ran."""
    if config is None and interpreting():
        fit = [c for c in mk.INTERPRET_CONFIGS if mk.fits(c, {**meta, **shape})]
        config = _as_dict(fit[0] if fit else mk.fallback({**meta, **shape}))
    if config is None:
        tuned[grid](*args, **meta)
        return int(tuned.best_config.kwargs["SPLIT_K"])
    mk._moe_kernel[grid(config)](*args, **meta, **config)
    return int(config["SPLIT_K"])


def _as_dict(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def moe_decode_triton(x: torch.Tensor, weights: torch.Tensor, plan: RoutePlan, experts: GroupedExperts,
                      up_config: dict | None = None, down_config: dict | None = None) -> torch.Tensor:
    """The grouped kernels (_moe_kernels.py): x's MMA orders for the quantized experts, the up projections of
    every routed expert in one launch (and the sum of their K splits), the down projections in one, the combine;
    no host sync (the plan stays on the device). The plan is of top-k indices: a token's k experts are distinct,
    so an expert serves at most T slots (the launch covers that many). Tiles autotuned on the first call per
    shape (make it eagerly, before a CUDA graph capture), or `up_config` / `down_config` ({BN, BK, SPLIT_K[,
    num_warps, num_stages]})."""
    check_args(x, weights, plan, experts)
    if not kernel_supports(experts):
        raise ValueError(f"experts: the kernels take groups of whole 4-word blocks, <= 128 values, and d_model, "
                         f"d_ff multiples of 16; got group_size={experts.group_size}, bits {sorted(experts.quant)}")
    t, d = x.shape
    k, f, n = weights.shape[1], experts.d_ff, len(experts)
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    weights = weights.float().contiguous()
    s, g, dev = t * k, experts.group_size or 64, x.device
    has = {b: (b in experts.quant) if b != 16 else experts.dense is not None for b in PRECISIONS}
    quant = has[4] or has[2]
    # an expert serves at most T slots (a token's k experts are distinct), in chunks of BM: one at decode sizes;
    # BM = 64 spills registers in sm_90 builds
    bm = min(32, max(16, triton.next_power_of_2(t)))
    chunks = triton.cdiv(t, bm)
    meta = dict(GROUP=g, HAS16=has[16], HAS4=has[4], HAS2=has[2], BM=bm, ASM=not interpreting(), DOT_F32=interpreting())
    xv = {b: torch.empty((t, d), dtype=x.dtype, device=dev) if has[b] else x for b in (4, 2)}
    xs = torch.empty((d // g, t), dtype=torch.float32, device=dev) if quant else weights
    if quant:
        block = max(256, g)
        mk._moe_prep_kernel[(triton.cdiv(d, block), t)](x, xv[4], xv[2], xs, t, d, x.stride(0), GROUP=g,
                                                        HAS4=has[4], HAS2=has[2], BLOCK=block)
    h = torch.empty((s, f), dtype=x.dtype, device=dev)
    hs = torch.empty((f // g, s), dtype=torch.float32, device=dev) if quant else weights
    route = (experts.table, plan.offsets, plan.order)
    grid = lambda c, size: (n * chunks, triton.cdiv(size, c["BN"]), c["SPLIT_K"])  # noqa: E731
    hp = torch.empty((mk.MAX_UP_SPLIT if up_config is None else up_config["SPLIT_K"], s, f), dtype=torch.float32,
                     device=dev)
    split = _launch(mk._moe_up_tuned, (x, xv[4], xv[2], xs, *experts.kernel_args("up"), *route, h, hs, hp, f, d, t, s,
                                       k, x.stride(0), n), dict(meta, UP=True), dict(N=f, K=d),
                    lambda c: grid(c, f), up_config)
    if split > 1:  # h = gelu(sum of the splits), stored as each expert's down projection reads it
        mk._moe_up_finish_kernel[(n * chunks, triton.cdiv(f, mk.FINISH_BN))](
            hp, *route, h, hs, f, s, n, SPLIT_K=split, GROUP=g, HAS16=has[16], HAS4=has[4], HAS2=has[2], BM=bm,
            BN=mk.FINISH_BN)
    yp = torch.empty((mk.MAX_SPLIT if down_config is None else down_config["SPLIT_K"], s, d), dtype=torch.float32,
                     device=dev)
    split = _launch(mk._moe_down_tuned, (h, h, h, hs, *experts.kernel_args("down"), *route, yp, yp, yp, d, f, s, s, 1,
                                         f, n), dict(meta, UP=False), dict(N=d, K=f), lambda c: grid(c, d), down_config)
    mk._moe_combine_kernel[(t, triton.cdiv(d, mk.COMBINE_BLOCK))](yp, weights, out, s, d, TOPK=k, SPLIT_K=split,
                                                                   BLOCK=mk.COMBINE_BLOCK)
    return out
