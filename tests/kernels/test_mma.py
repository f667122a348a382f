"""The weight-stationary tensor-core decode kernel (mma.py) against the reference, its x rearrangement and its
autotune space."""
import pytest
import torch

from dequant_cases import DEV, case, needs_kernel, rel
from ttha.kernels import _backend, dequant_linear_triton, mma
from ttha.kernels._common import MAX_PER_SM, MIN_PROGRAMS


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (2, 64), (2, 128)])
@pytest.mark.parametrize("m,bias,dtype,split", [(1, True, torch.bfloat16, 4), (3, False, torch.float16, 1),
                                                (17, True, torch.bfloat16, 2)])
def test_mma_kernel_matches_reference(bits, group, m, bias, dtype, split):
    """The weight-stationary tensor-core kernel (x in MMA order, codes exact in x's dtype, scale and min applied
    per group in fp32): N = 72 is not a multiple of BN = 64, K = 4 groups in 1..4 splits; M = 17 is one BM = 32
    tile with rows masked."""
    x, qw, b, ref = case(m, 72, 4 * group, bits, group, dtype=dtype, bias=bias, seed=bits * group + m)
    y = dequant_linear_triton(x, qw, b, config={"BN": 64, "SPLIT_K": split}, path="mma")
    assert y.shape == (m, 72) and y.dtype == dtype and not y.isnan().any()
    # only the output rounding: the products and sums are exact or fp32
    assert rel(y, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (72, 4 * 128)])
def test_mma_autotune_space_fits_the_kernel(group, n, k):
    """Every tuned split of the MMA kernel covers whole groups; real shapes get 1 to MAX_PER_SM programs an H100 SM."""
    configs = mma._prune_mma(mma.MMA_CONFIGS, {"GROUP": group, "K": k, "N": n})
    assert configs
    for c in configs:
        assert (k // group) % c.kwargs["SPLIT_K"] == 0
        if n > 1000:
            assert MIN_PROGRAMS <= -(-n // c.kwargs["BN"]) * c.kwargs["SPLIT_K"] <= MAX_PER_SM * MIN_PROGRAMS


@needs_kernel
def test_mma_path_refuses_two_bit_groups_of_32():
    x, qw, b, _ = case(1, 16, 64, 2, 32)
    with pytest.raises(ValueError, match="group_size=32"):
        dequant_linear_triton(x, qw, b, path="mma")


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_x_mma_kernel_writes_x_in_mma_order_group_sums_and_zeros_y(bits, dtype):
    """x in MMA order and each group's sum; with ZERO, y's rows cleared for the main kernel's split-K adds (every
    element, though N = 100 is not a multiple of the programs)."""
    m, k, group, n = 3, 1024, 64, 100
    x = torch.randn(m, k).to(DEV, dtype)
    kw, ng = k * bits // 32, k // group
    xv = torch.empty_like(x)
    xs = torch.empty((ng, m), dtype=torch.float32, device=DEV)
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    programs = kw // 32
    mma._x_mma_kernel[(programs, m)](x, xv, xs, y, m, kw, ng, n, x.stride(0), BITS=bits, GROUP=group, BKW=32,
                                    ZERO=True)
    assert torch.equal(xv[:, mma.mma_order(bits, k).to(DEV)], x)
    torch.testing.assert_close(xs, x.float().reshape(m, ng, group).sum(-1).T, rtol=1e-5, atol=1e-5)
    assert programs > 1 and torch.equal(y, torch.zeros_like(y))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mma_kernel_real_sizes(bits, m, dtype):
    x, qw, b, ref = case(m, 4096, 14336, bits, 128, dtype=dtype, seed=m + 7)
    y = dequant_linear_triton(x, qw, b, path="mma")
    assert y.dtype == dtype and rel(y, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-3)  # output rounding
