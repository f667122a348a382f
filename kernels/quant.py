"""Group-wise asymmetric 4/2-bit weight quantization: quantize, pack, dequantize (torch reference).

A [N, K] weight is split into groups of `group_size` consecutive values along K. Each group
keeps a scale and a minimum so that w ≈ q * scale + min with q in [0, 2**bits - 1]
(one FMA per value when dequantizing). Codes are packed along K into int32 words,
32 // bits codes per word, code j of a word in bits [bits*j, bits*(j+1)).

The words are stored tile by tile for the kernels: the words of one group of TILE_ROWS consecutive rows are one
contiguous block (packed [ceil(N / TILE_ROWS), NG, TILE_ROWS, words per group], the last block's missing rows
zero), and (scale, min) are stored group-major [NG, N], so a group's parameters of consecutive rows are
contiguous too: a group of one row is only 32-64 bytes, and rows read piece by piece stream far below the copy
bandwidth. `row_words` gives the row-major [N, K * bits // 32] words.

Standalone (torch only): the kernels beside it and ttha's model both read this format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
TILE_ROWS = 64  # rows of a contiguous block of words (one group each)


@dataclass
class QuantizedWeight:
    packed: torch.Tensor  # int32 [ceil(N / TILE_ROWS), K // group_size, TILE_ROWS, group_size * bits // 32]
    scales: torch.Tensor  # fp16 [K // group_size, N]
    mins: torch.Tensor  # fp16 [K // group_size, N]
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the original weight

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.packed.to(device), self.scales.to(device), self.mins.to(device),
                               self.bits, self.group_size, self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.mins))


def _check(w: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: must be one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: must be one of {SUPPORTED_GROUP_SIZES}")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if w.shape[1] % group_size:
        raise ValueError(f"w: K={w.shape[1]} is not a multiple of group_size={group_size}")


def quantize(w: torch.Tensor, bits: int, group_size: int = 64) -> QuantizedWeight:
    """Quantize a [N, K] float weight to `bits` with one (scale, min) per group of K values."""
    _check(w, bits, group_size)
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    # Round scale and min to fp16 first so the codes are chosen against what dequantize uses.
    scale16, lo16 = scale.half(), lo.half()
    q = torch.round((g - lo16.float()[..., None]) / scale16.float()[..., None]).clamp_(0, qmax)
    codes = q.to(torch.int32).reshape(n, k)
    per_word = 32 // bits
    codes = codes.reshape(n, k // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=w.device) * bits
    packed = (codes << shifts).sum(-1, dtype=torch.int64).to(torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return QuantizedWeight(tile_words(packed, k // group_size), scale16.t().contiguous(), lo16.t().contiguous(),
                           bits, group_size, (n, k))


def tile_words(words: torch.Tensor, groups: int) -> torch.Tensor:
    """Row-major int32 words [N, KW] -> the stored tiles [ceil(N / TILE_ROWS), groups, TILE_ROWS, KW // groups]."""
    n, kw = words.shape
    blocks = -(-n // TILE_ROWS)
    padded = words.new_zeros((blocks * TILE_ROWS, kw))
    padded[:n] = words
    return padded.reshape(blocks, TILE_ROWS, groups, kw // groups).permute(0, 2, 1, 3).contiguous()


def row_words(qw: QuantizedWeight) -> torch.Tensor:
    """The row-major int32 words [N, K * bits // 32] of the stored tiles."""
    n = qw.shape[0]
    blocks, groups, rows, wpg = qw.packed.shape
    return qw.packed.permute(0, 2, 1, 3).reshape(blocks * rows, groups * wpg)[:n]


def row_major(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words [N, KW], scales [N, NG], mins [N, NG]), contiguous copies: the row-major layout other libraries
    take (the benchmark's gemlite column)."""
    return row_words(qw).contiguous(), qw.scales.t().contiguous(), qw.mins.t().contiguous()


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """int32 codes [N, K] from the packed words."""
    n, k = qw.shape
    per_word = 32 // qw.bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=qw.packed.device) * qw.bits
    codes = (row_words(qw)[..., None] >> shifts) & (2**qw.bits - 1)
    return codes.reshape(n, k)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the codes stand for: q * scale + min, per group."""
    n, k = qw.shape
    q = unpack_codes(qw).float().reshape(n, k // qw.group_size, qw.group_size)
    w = q * qw.scales.t().float()[..., None] + qw.mins.t().float()[..., None]
    return w.reshape(n, k).to(dtype)
