"""The fused dequant-matmul kernel (fused.py): every tile regime against the reference, and its autotune space."""
import pytest
import torch

from dequant_cases import case, needs_kernel, rel
from ttha.kernels import _backend, dequant_linear_triton, fused


@needs_kernel
def test_fp16_leading_dims_and_tile_config():
    x, qw, b, ref = case(0, 48, 256, 4, 64, dtype=torch.float16, lead=(2, 3), seed=7)
    y = dequant_linear_triton(x, qw, b, config={"BM": 8, "BN": 32, "BKW": 16, "SPLIT_K": 1, "USE_DOT": False})
    assert y.shape == (2, 3, 48) and y.dtype == torch.float16
    assert rel(y, ref) < 2e-3  # fp16 output rounding only


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_tensor_core_tiles_of_whole_groups(bits, dtype, group):
    """Tensor-core decode tiles spanning several groups (scales repeated over their words in registers) or
    inside one, for both input dtypes."""
    config = {"BM": 16, "BN": 16, "BKW": 8 * 4 // bits, "SPLIT_K": 2, "USE_DOT": True}
    x, qw, b, ref = case(13, 40, 4 * 128, bits, group, dtype=dtype, seed=bits + group)
    y = dequant_linear_triton(x, qw, b, config=config)
    assert y.dtype == dtype and not y.isnan().any()
    assert rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)  # operand and output rounding


@needs_kernel
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("config", [
    {"BM": 1, "BN": 16, "BKW": 32, "SPLIT_K": 1, "USE_DOT": False},  # decode, FMA units
    {"BM": 2, "BN": 16, "BKW": 16, "SPLIT_K": 2, "USE_DOT": False, "PLANES": True},  # decode, FMA by planes
    {"BM": 4, "BN": 16, "BKW": 16, "SPLIT_K": 4, "USE_DOT": False},  # decode, split-K + reduce kernel
    {"BM": 16, "BN": 32, "BKW": 16, "SPLIT_K": 3, "USE_DOT": True},  # tensor cores, uneven split
    {"BM": 32, "BN": 16, "BKW": 16, "SPLIT_K": 1, "USE_DOT": True},  # mid-M tiles
])
def test_every_tile_regime_matches_reference(bits, config):
    m = config["BM"] if config["BM"] > 1 else 1
    x, qw, b, ref = case(m - (m > 1), 40, 256, bits, 64, seed=bits + config["BM"])  # M just under the tile
    y = dequant_linear_triton(x, qw, b, config=config)
    assert not y.isnan().any() and rel(y, ref) < 1e-2


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m_bucket", [1, 2, 4, 8, 16, 32, 512])
def test_autotune_space_fits_each_regime(bits, group, m_bucket):
    configs = fused._prune(fused.DECODE_CONFIGS + fused.MID_CONFIGS, {"M_BUCKET": m_bucket}, BITS=bits, GROUP=group)
    assert configs
    for c in configs:
        kw = c.kwargs
        if kw["USE_DOT"]:  # tensor cores: decode tiles only for decode, a bounded unpacked tile
            assert (kw["BM"] == 16) == (m_bucket <= fused.SMALL_M) and kw["BKW"] * (32 // bits) <= fused.MAX_DOT_BK
        else:  # FMA: rows = the M bucket, [BM, BN, BK] accumulator within 64 fp32 registers a thread
            assert kw["BM"] == m_bucket <= fused.SMALL_M
            acc = kw["BM"] * kw["BN"] * kw["BKW"] * (1 if kw["PLANES"] else 32 // bits)
            assert acc <= 64 * 32 * c.num_warps
