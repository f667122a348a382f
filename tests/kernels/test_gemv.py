"""The decode GEMV (gemv.py) against the reference, and its autotune space."""
import pytest
import torch

from dequant_cases import case, needs_kernel, rel
from ttha.kernels import _backend, dequant_linear_triton, gemv


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,bias,split", [(1, True, 1), (1, False, 3), (3, True, 2)])
def test_gemv_kernel_matches_reference(bits, group, m, bias, split):
    """The decode GEMV kernel (x by half2 pairs, per word code-times-x sums, scales per group): N = 40 is not
    a multiple of BN = 16; K = 6 groups in 1..3 splits; tiles of one group or two."""
    x, qw, b, ref = case(m, 40, 6 * group, bits, group, dtype=torch.float16, bias=bias, seed=bits * group + m)
    bkw = group // (32 // bits) * (1 if split == 2 else 2)
    config = {"BN": 16, "BKW": bkw, "SPLIT_K": split, "NUM_STAGES": 3 if split == 3 else 1}
    y = dequant_linear_triton(x, qw, b, config=config, path="gemv")
    assert y.shape == (m, 40) and not y.isnan().any()
    assert rel(y, ref) < 2e-3  # fp16 output rounding only


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (40, 96 * 32)])
def test_gemv_autotune_space_fits_the_kernel(bits, group, n, k):
    """Every tuned GEMV tile covers whole groups and every split whole tiles (the kernel relies on both)."""
    kw = k * bits // 32
    configs = gemv._prune_gemv(gemv.GEMV_CONFIGS, {"BITS": bits, "GROUP": group, "KW": kw, "N": n})
    assert configs
    for c in configs:
        assert c.kwargs["BKW"] * 32 // bits % group == 0 and kw % (c.kwargs["SPLIT_K"] * c.kwargs["BKW"]) == 0


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits,group", [(4, 32), (2, 32), (2, 64), (4, 128)])
def test_gemv_space_is_never_empty(bits, group):
    """K = 3 small groups (12 or 6 words) fits no tuned tile width: the space falls back to one-group tiles
    (on the GPU the first M = 1 call of such a shape failed with "max() arg is an empty sequence")."""
    kw = 3 * group * bits // 32
    configs = gemv._prune_gemv(gemv.GEMV_CONFIGS, {"BITS": bits, "GROUP": group, "KW": kw, "N": 40})
    assert configs
    for c in configs:
        assert c.kwargs["BKW"] * 32 // bits % group == 0 and kw % (c.kwargs["SPLIT_K"] * c.kwargs["BKW"]) == 0
