"""Shared by the dequant-linear tests: a quantized weight, x, bias and their fp32 reference on the test device."""
import pytest
import torch

from ttha.kernels import _backend
from ttha.kernels.quant import dequantize, quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not _backend.HAS_TRITON or (DEV == "cpu" and not _backend.interpreting()),
    reason="needs triton on CUDA or TRITON_INTERPRET=1")


def rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def case(m, n, k, bits, group, dtype=torch.bfloat16, bias=True, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw = quantize(w, bits, group).to(DEV)
    shape = (*lead, k) if lead else (m, k)
    x = torch.randn(*shape, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    # fp32 reference on the same dequantized weight: only the kernel's output rounding differs
    ref = x.float() @ dequantize(qw).T + (b.float() if bias else 0)
    return x, qw, b, ref
