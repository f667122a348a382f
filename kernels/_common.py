"""What the dequant-linear kernels share: the stored tiles' addressing, the split-K output (stored, added or
reduced), programmatic dependent launch, and how many programs a decode config may give an SM.

The weight's words are stored in tiles (quant.py): the words of one group of TILE_ROWS consecutive rows are one
contiguous block, so a tile of rows streams from DRAM in long pieces.
"""
from __future__ import annotations

from ._backend import HAS_TRITON, triton, tl
from .quant import TILE_ROWS

MIN_PROGRAMS = 132  # one per SM of an H100: fewer leave SMs idle
# Most programs an SM in the decode spaces: with split-K partials added in place (_split_adds) a wide split costs
# no reduction, and the fastest decode tiles of large weights run tens of programs an SM.
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
