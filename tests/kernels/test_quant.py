"""ttha.kernels.quant: packing round trip, per-group error bound, argument errors."""
import pytest
import torch

from ttha.kernels.quant import TILE_ROWS, QuantizedWeight, dequantize, quantize, row_words, tile_words, unpack_codes


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_error_within_half_step_per_group(bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(24, 4 * group_size) * torch.rand(24, 1) * 3
    qw = quantize(w, bits, group_size)
    deq = dequantize(qw)
    n, k = w.shape
    err = (w - deq).abs().reshape(n, k // group_size, group_size).amax(-1)
    scale = qw.scales.t().float()  # stored [NG, N]
    # half a step, plus the fp16 rounding of the stored min (codes are chosen against fp16 values)
    bound = scale / 2 + qw.mins.t().float().abs() * 2**-11 + 1e-6
    assert (err <= bound).all(), (err - bound).max()
    # and the codes really use the range: the group max and min are reached within half a step
    g = w.reshape(n, k // group_size, group_size)
    assert ((deq.reshape_as(g).amax(-1) - g.amax(-1)).abs() <= bound).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_layout_and_fields(bits):
    w = torch.randn(8, 64)
    qw = quantize(w, bits, 32)
    wpg = 32 * bits // 32
    # one block of TILE_ROWS rows per group, the 56 rows past N zero; (scale, min) group-major
    assert qw.packed.dtype == torch.int32 and qw.packed.shape == (1, 2, TILE_ROWS, wpg)
    assert qw.packed[:, :, 8:].eq(0).all()
    assert qw.scales.shape == qw.mins.shape == (2, 8) and qw.scales.dtype == torch.float16
    assert qw.shape == (8, 64) and qw.bits == bits and qw.group_size == 32
    assert qw.nbytes == TILE_ROWS * 64 * bits // 8 + 2 * 8 * 2 * 2
    codes = unpack_codes(qw)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    # code j of word i holds K index i * (32 // bits) + j, in bits [bits*j, bits*(j+1))
    words = row_words(qw)
    assert words.shape == (8, 64 * bits // 32)
    word = int(words[3, 1]) & 0xFFFFFFFF
    per_word = 32 // bits
    expect = [(word >> (bits * j)) & (2**bits - 1) for j in range(per_word)]
    assert codes[3, per_word:2 * per_word].tolist() == expect
    # word 1 of row 3 is in group 1 // wpg, at word 1 % wpg of that group's block
    assert int(qw.packed[0, 1 // wpg, 3, 1 % wpg]) == int(words[3, 1])
    # the scale of group 1 of row 5 is what the codes of that group were scaled by
    g1 = w[5, 32:]
    assert torch.allclose(qw.scales[1, 5].float(), (g1.max() - g1.min()) / (2**bits - 1), rtol=1e-3)


@pytest.mark.parametrize("n", [1, 64, 65, 130])
def test_tiles_round_trip_any_rows(n):
    w = torch.randn(n, 256)
    qw = quantize(w, 4, 64)
    assert qw.packed.shape == (-(-n // TILE_ROWS), 4, TILE_ROWS, 8)
    assert torch.equal(tile_words(row_words(qw), 4), qw.packed)
    assert (dequantize(qw) - w).abs().max() <= qw.scales.float().max() / 2 + 1e-2


def test_constant_group_is_exact_and_to_keeps_fields():
    w = torch.full((4, 32), 0.75)
    qw = quantize(w, 4, 32)
    assert torch.allclose(dequantize(qw), w, atol=1e-3)
    moved = qw.to("cpu")
    assert isinstance(moved, QuantizedWeight) and moved.bits == 4 and torch.equal(moved.packed, qw.packed)
    assert dequantize(qw, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,name", [
    (dict(w=torch.randn(4, 64), bits=3, group_size=32), "bits"),
    (dict(w=torch.randn(4, 64), bits=4, group_size=48), "group_size"),
    (dict(w=torch.randn(4, 96), bits=4, group_size=64), "K=96"),
    (dict(w=torch.randn(64), bits=4, group_size=32), "w"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        quantize(**kwargs)
