"""Group-wise asymmetric 4/2-bit weight quantization: quantize, pack, dequantize (torch reference).

A [N, K] weight is split into groups of `group_size` consecutive values along K. Each group
keeps a scale and a minimum so that w ≈ q * scale + min with q in [0, 2**bits - 1]
(one FMA per value when dequantizing). Codes are packed along K into int32 words,
32 // bits codes per word, code j of a word in bits [bits*j, bits*(j+1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizedWeight:
    packed: torch.Tensor  # int32 [N, K * bits // 32]
    scales: torch.Tensor  # fp16 [N, K // group_size]
    mins: torch.Tensor  # fp16 [N, K // group_size]
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
    return QuantizedWeight(packed.contiguous(), scale16.contiguous(), lo16.contiguous(), bits, group_size, (n, k))


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """int32 codes [N, K] from the packed words."""
    n, k = qw.shape
    per_word = 32 // qw.bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=qw.packed.device) * qw.bits
    codes = (qw.packed[..., None] >> shifts) & (2**qw.bits - 1)
    return codes.reshape(n, k)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the codes stand for: q * scale + min, per group."""
    n, k = qw.shape
    q = unpack_codes(qw).float().reshape(n, k // qw.group_size, qw.group_size)
    w = q * qw.scales.float()[..., None] + qw.mins.float()[..., None]
    return w.reshape(n, k).to(dtype)
