"""The decode step captured as a CUDA graph (ttha/decode.py), on the GPU:
python -m pytest -m gpu tests/test_decode_gpu.py"""
import pytest
import torch
from omegaconf import OmegaConf

from ttha.decode import Decoder
from ttha.model import MoELM, quantize_experts, softmax_topk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = OmegaConf.create(dict(name="g", vocab_size=256, d_model=256, n_layers=2, n_heads=4, d_ff=1024, n_experts=8,
                            top_k=2, max_seq_len=64, dtype="bf16"))
BITS = [16, 4, 2]  # expert i: BITS[i % 3]
SIXTEEN = [0, 3, 6]
B = 16


def model():
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = MoELM(CFG)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.1)
    return quantize_experts(m.to(torch.bfloat16), BITS, 64).eval()


def inputs(t):
    """Step t's tokens and positions; stream b restarts every 5 + b steps: streams at different positions."""
    return torch.randint(0, 256, (B,), generator=torch.Generator().manual_seed(t)), [t % (5 + b) for b in range(B)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_gpu_graph_replay_equals_the_eager_step():
    m = model()
    graphed = Decoder(m, B)
    eager = Decoder(m, B, graph=False)
    assert graphed.graphed and not eager.graphed
    for t in range(12):
        tokens, pos = inputs(t)
        got = graphed.step(tokens.cuda(), pos).clone()
        want = eager.step(tokens, pos)
        assert torch.equal(graphed.counts, eager.counts)
        assert rel(got, want) < 1e-3
    assert graphed.captures == 1


def test_gpu_bias_in_place_keeps_tokens_off_16bit_experts_whose_weights_are_never_read():
    """Captured with a zero bias; then a bias written in place keeps every token off the 16-bit experts and
    their stacked weights turn NaN: no recapture, their counts are 0, the logits are finite, equal the eager
    step's on clean weights under that bias and differ from the unbiased step's."""
    m = model()
    graphed = Decoder(m, B)
    eager = Decoder(m, B, graph=False)  # each decoder stacks its own copy: poisoning graphed's spares these
    plain = Decoder(m, B, graph=False)
    for t in range(6):
        tokens, pos = inputs(t)
        graphed.step(tokens, pos)
        eager.step(tokens, pos)
        plain.step(tokens, pos)
    bias = torch.zeros(CFG.n_experts)
    bias[SIXTEEN] = -1e4
    graphed.set_bias(bias)
    eager.set_bias(bias)
    for stack in graphed.experts:
        stack.dense[0].fill_(float("nan"))
        stack.dense[1].fill_(float("nan"))
    for t in range(6, 12):
        tokens, pos = inputs(t)
        got = graphed.step(tokens, pos).clone()
        want, unbiased = eager.step(tokens, pos), plain.step(tokens, pos)
        assert graphed.counts[:, SIXTEEN].sum() == 0 and plain.counts[:, SIXTEEN].sum() > 0
        assert got.isfinite().all() and rel(got, want) < 1e-3 and rel(got, unbiased) > 1e-2
    assert graphed.captures == 1


def test_gpu_a_graph_of_four_steps_equals_the_eager_steps():
    """steps=4: one replay gives the counts of four eager steps and their NLL, captured once."""
    m = model()
    graphed, eager = Decoder(m, B, steps=4), Decoder(m, B, steps=4, graph=False)
    for t0 in range(0, 12, 4):
        steps = [inputs(t) for t in range(t0, t0 + 5)]
        tokens, pos = torch.stack([s[0] for s in steps]), torch.tensor([s[1] for s in steps])
        got = graphed.run(tokens[:4].cuda(), pos[:4], tokens[1:].cuda()).clone()
        want = eager.run(tokens[:4], pos[:4], tokens[1:])
        assert torch.equal(graphed.step_counts, eager.step_counts)
        assert rel(got, want) < 1e-3
    same = torch.arange(4).unsqueeze(1).expand(4, B)  # every stream at one position: a zero-stride view, as serving
    got = graphed.run(tokens[:4], same, tokens[1:]).clone()
    assert rel(got, eager.run(tokens[:4], same, tokens[1:])) < 1e-3
    assert graphed.captures == 1


def test_gpu_decode_follows_the_full_forward():
    """Teacher-forced on one sequence per stream: the captured step's logits against the bf16 full forward."""
    m = model()
    seqs = torch.randint(0, 256, (B, 24), generator=torch.Generator().manual_seed(1)).cuda()
    m.set_router(lambda logits, layer: softmax_topk(logits, CFG.top_k))
    with torch.no_grad():
        ref = m(seqs).float()
    dec = Decoder(m, B)
    for t in range(seqs.shape[1]):
        got = dec.step(seqs[:, t], [t] * B)
        assert rel(got, ref[:, t]) < 3e-2
