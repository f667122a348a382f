"""The KV-cache decode step (ttha/decode.py) against the model's full-sequence forward, on a tiny model (CPU).
The captured CUDA graph: test_decode_gpu.py."""
import pytest
import torch
from omegaconf import OmegaConf

from ttha import kernels
from ttha.decode import Decoder, expert_byte_share, kv_cache_bytes, step_bytes
from ttha.kernels import _backend
from ttha.model import MoELM, quantize_experts, softmax_topk

TINY = OmegaConf.create(dict(name="t", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=6,
                             top_k=2, max_seq_len=32, dtype="fp32"))
LENGTHS = (7, 5, 9)  # stream b restarts every LENGTHS[b] steps: streams at different positions, restarts apart
STEPS = 16


def tiny_model(bits, dtype=torch.float32, seed=0) -> MoELM:
    torch.manual_seed(seed)
    model = MoELM(TINY)
    with torch.no_grad():  # weights larger than the init's: routing far from ties, logits far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return quantize_experts(model, bits, 64).to(dtype).eval()


def sequences(seed=1):
    """seqs[b][n]: stream b's n-th sequence (LENGTHS[b] bytes)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (n,), generator=g) for _ in range(STEPS // n + 1)] for n in LENGTHS]


def schedule(t):
    """(positions, which sequence) of each stream at step t."""
    return [t % n for n in LENGTHS], [t // n for n in LENGTHS]


def full_forward_logits(model, seqs, bias=None):
    """ref[b][n]: the full forward's logits [len, V] of stream b's sequence n, routed with softmax(logits + bias)
    top-k, and the experts each layer routed position p to (routes[b][n][layer] [len, k])."""
    k = TINY.top_k
    routes = {}

    def router(logits, layer):
        w, idx = softmax_topk(logits if bias is None else logits + bias, k)
        routes[layer] = idx
        return w, idx

    model.set_router(router)
    ref, picked = [], []
    with torch.no_grad():
        for stream in seqs:
            ref.append([])
            picked.append([])
            for s in stream:
                ref[-1].append(model(s[None]).float()[0])
                picked[-1].append([routes[layer] for layer in range(TINY.n_layers)])
    model.set_router(None)
    return ref, picked


def decode(dec, seqs, steps=STEPS, start=0):
    """Teacher-forced: each stream's input is the true byte of its current sequence at its position."""
    out = []
    for t in range(start, steps):
        pos, n = schedule(t)
        tokens = torch.stack([seqs[b][n[b]][pos[b]] for b in range(len(LENGTHS))])
        out.append((dec.step(tokens, pos).clone(), dec.counts.clone()))
    return out


def worst(out, ref, steps=STEPS):
    """Largest |decode - full forward| over streams and steps, relative to the largest |logit|."""
    err = 0.0
    for t in range(steps):
        pos, n = schedule(t)
        for b in range(len(LENGTHS)):
            r = ref[b][n[b]][pos[b]]
            err = max(err, float((out[t][0][b] - r).abs().max() / r.abs().max()))
    return err


@pytest.mark.parametrize("bits", [[16], [16, 4, 2], [16, 8], [2], [4, 2]])
def test_teacher_forced_decode_equals_full_forward_fp32(bits):
    """fp32 (the CPU default): every stream's logits at every step equal the full forward's at that position,
    streams at different positions restarting at different steps; fp32 and fp8 experts, and quantized ones in an
    fp32 model (the bounds' experts=int2 on a CPU), run through the expert modules."""
    model = tiny_model(bits)
    seqs = sequences()
    ref, _ = full_forward_logits(model, seqs)
    dec = Decoder(model, len(LENGTHS))
    assert not dec.graphed
    assert worst(decode(dec, seqs), ref) < 1e-5


@pytest.mark.parametrize("bits", [[16], [16, 4, 2]])
def test_bf16_decode_runs_the_grouped_experts_and_matches_full_forward(bits):
    """bf16: the layer's experts stacked as a GroupedExperts (moe_decode's reference on CPU, fp32 accumulation)
    against the model's bf16 forward: equal up to bf16 rounding."""
    model = tiny_model(bits, torch.bfloat16)
    seqs = sequences()
    ref, _ = full_forward_logits(model, seqs)
    dec = Decoder(model, len(LENGTHS))
    assert dec.experts is not None and dec.experts[0].bits == tuple(bits[i % len(bits)] for i in range(6))
    assert worst(decode(dec, seqs), ref) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_replay_of_several_steps_equals_the_steps_one_at_a_time(dtype):
    """steps=4: one run() gives each step's counts and its NLL against the targets as four single steps give
    them (the logits' cross-entropy), and leaves the last step's logits and gate logits."""
    model = tiny_model([16, 4, 2], dtype)
    seqs = sequences()
    single, multi = Decoder(model, len(LENGTHS)), Decoder(model, len(LENGTHS), steps=4)
    for t0 in range(0, STEPS - 4, 4):  # a replay's streams restart at different steps
        pos = torch.tensor([schedule(t)[0] for t in range(t0, t0 + 5)])
        tok = torch.stack([torch.stack([seqs[b][schedule(t)[1][b]][schedule(t)[0][b]] for b in range(3)])
                           for t in range(t0, t0 + 5)])
        want_nll, want_counts = [], []
        for i in range(4):
            logits = single.step(tok[i], pos[i])
            want_nll.append(float(torch.nn.functional.cross_entropy(logits, tok[i + 1], reduction="sum")))
            want_counts.append(single.counts.clone())
        nll = multi.run(tok[:4], pos[:4], tok[1:])
        assert nll.tolist() == pytest.approx(want_nll, rel=1e-5)
        assert torch.equal(multi.step_counts, torch.stack(want_counts))
        assert torch.equal(multi.logits, single.logits) and torch.equal(multi.gate_logits, single.gate_logits)
    with pytest.raises(ValueError, match="call run"):
        multi.step(tok[0], pos[0])
    with pytest.raises(ValueError, match="^tokens"):
        multi.run(tok[:3], pos[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_written_in_place_steers_routing_and_counts_follow_it(dtype):
    """A bias that keeps tokens off the 16-bit experts, written in place after the first step: from then on no
    token reaches them, counts are the full forward's routes at each stream's position under that bias, and the
    sequences begun after the change get the full forward's logits under it (not the unbiased ones)."""
    bits = [16, 4, 2]
    model = tiny_model(bits, dtype)
    seqs = sequences()
    bias = torch.zeros(6)
    bias[[0, 3]] = -1e4
    plain, _ = full_forward_logits(model, seqs)
    ref, routes = full_forward_logits(model, seqs, bias)
    dec = Decoder(model, len(LENGTHS))
    out = decode(dec, seqs, 1)
    dec.set_bias(bias)
    out += decode(dec, seqs, STEPS, start=1)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert worst(out, plain, 1) < tol
    for t in range(1, STEPS):
        pos, n = schedule(t)
        counts = out[t][1]
        assert counts[:, [0, 3]].sum() == 0
        for layer in range(TINY.n_layers if min(n) > 0 else 0):  # counts: once every stream began anew
            idx = torch.stack([routes[b][n[b]][layer][pos[b]] for b in range(len(LENGTHS))])
            assert counts[layer].tolist() == torch.bincount(idx.flatten(), minlength=6).tolist()
        for b in range(len(LENGTHS)):
            if n[b] == 0:  # its sequence began before the bias changed: its cache holds unbiased routing
                continue
            r, p = ref[b][n[b]][pos[b]], plain[b][n[b]][pos[b]]
            assert float((out[t][0][b] - r).abs().max() / r.abs().max()) < tol
            assert float((out[t][0][b] - p).abs().max() / p.abs().max()) > 10 * tol


needs_kernel = pytest.mark.skipif(not _backend.HAS_TRITON or (not torch.cuda.is_available()
                                                              and not _backend.interpreting()),
                                  reason="needs triton on CUDA or TRITON_INTERPRET=1")


@needs_kernel
def test_kernel_step_matches_reference_and_never_reads_experts_the_bias_keeps_out():
    """The Triton path (router kernel writing the plan, grouped MoE kernels; the interpreter on CPU) against the
    torch path, step by step. After the first step a bias keeps tokens off the 16-bit experts and their stacked
    weights turn NaN: the logits stay finite and equal the torch path's on clean weights."""
    model = tiny_model([16, 4, 2], torch.bfloat16)
    seqs = sequences()
    ref_dec = Decoder(model, len(LENGTHS))
    try:
        kernels.set_backend("triton")
        dec = Decoder(model, len(LENGTHS))
        out = decode(dec, seqs, 1)
        bias = torch.zeros(6)
        bias[[0, 3]] = -1e4
        dec.set_bias(bias)
        for stack in dec.experts:
            stack.dense[0].fill_(float("nan"))
            stack.dense[1].fill_(float("nan"))
        out += decode(dec, seqs, 4, start=1)
    finally:
        kernels.set_backend("auto")
    ref = decode(ref_dec, seqs, 1)
    ref_dec.set_bias(bias)
    ref += decode(ref_dec, seqs, 4, start=1)
    for (logits, counts), (want, want_counts) in zip(out, ref):
        assert logits.isfinite().all()
        assert torch.equal(counts, want_counts)
        assert float((logits - want).abs().max() / want.abs().max()) < 3e-2
    assert out[-1][1][:, [0, 3]].sum() == 0


def test_experts_are_views_of_the_stacks_so_in_place_training_reaches_the_step():
    """The decoder stacks the experts once and the model's expert weights become views of the stacks: an
    optimizer step on the model after the decoder was built changes what the step computes (as test-time
    training does), and the step still equals the full forward of the updated model."""
    model = tiny_model([16, 4, 2], torch.bfloat16)
    dec = Decoder(model, 1)
    stack = dec.experts[1]
    assert model.moe_layers[1].experts[0].w1.weight.data_ptr() == stack.dense[0][0].data_ptr()
    assert model.moe_layers[1].experts[1].w2_packed.data_ptr() == stack.quant[4][1].packed[0].data_ptr()
    seq = sequences()[0][0]
    before = [dec.step(seq[p:p + 1], [p]).clone() for p in range(len(seq))]
    opt = torch.optim.SGD([p for p in model.parameters() if p.is_floating_point()], lr=0.5)
    model(seq[None]).float().logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        ref = model(seq[None]).float()[0]
    after = [dec.step(seq[p:p + 1], [p]).clone() for p in range(len(seq))]
    for p in range(len(seq)):
        assert float((after[p][0] - ref[p]).abs().max() / ref[p].abs().max()) < 3e-2
        assert float((after[p] - before[p]).abs().max()) > 0.1


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_bytes_is_what_the_decoder_allocates(dtype, size):
    model = tiny_model([16], dtype)
    assert Decoder(model, 3).cache_bytes == kv_cache_bytes(TINY, 3, dtype) == 2 * 2 * 3 * 32 * 64 * size
    assert Decoder(model, 5, max_seq_len=16).cache_bytes == kv_cache_bytes(TINY, 5, dtype, seq_len=16)
    assert kv_cache_bytes(TINY, 3, "bf16") == kv_cache_bytes(TINY, 3, torch.bfloat16)


def test_step_bytes_counts_the_stacked_experts_and_projections():
    """step_bytes' expert bytes are the stacked experts' (expert_bytes), each weighted by its chance of getting a
    token under uniform routing; its attention bytes are the qkv and output projections'."""
    model = tiny_model([16, 4, 2], torch.bfloat16)
    dec = Decoder(model, 4)
    parts = step_bytes(TINY, 4, [16, 4, 2], 64, "bf16")
    active = 1 - (1 - 2 / 6) ** 4
    stacked = sum(s.expert_bytes(e) for s in dec.experts for e in range(6))
    assert parts["experts"] == pytest.approx(active * stacked)
    block = model.blocks[0]
    assert parts["attention"] == 2 * 2 * (block.qkv.weight.numel() + block.proj.weight.numel())
    assert parts["kv_cache"] == dec.cache_bytes


def test_decode_preset_is_dominated_by_expert_weights(compose_cfg):
    """conf/model/decode.yaml: expert weights >= 80 % of what a 16-bit decode step of 16 streams reads; the
    tiny CPU model is far from it (attention and the cache weigh as much as its experts)."""
    cfg = compose_cfg("model=decode", "pretrain=decode")
    assert expert_byte_share(cfg.model, 16, [16]) >= 0.8
    assert cfg.pretrain.seq_len <= cfg.model.max_seq_len and cfg.model.d_ff >= 8192
    assert expert_byte_share(compose_cfg().model, 16, [16]) < 0.8


@pytest.mark.parametrize("call,match", [
    (lambda m: Decoder(m, 0), "batch_size=0"),
    (lambda m: Decoder(m, 2, max_seq_len=33), "max_seq_len=33"),
    (lambda m: Decoder(m, 2, graph=True), "graph=True"),
    (lambda m: Decoder(m, 2, steps=0), "steps=0"),
    (lambda m: Decoder(m, 2).step(torch.tensor([1, 2]), [0, 32]), "positions"),
    (lambda m: Decoder(m, 2).step(torch.tensor([1, 2]), [0]), "positions"),
    (lambda m: Decoder(m, 2).step(torch.tensor([1, 256]), [0, 1]), "tokens"),
    (lambda m: Decoder(m, 2).step(torch.tensor([1.0, 2.0]), [0, 1]), "tokens"),
    (lambda m: Decoder(m, 2).set_bias([0.0] * 5), "bias"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
    model = tiny_model([16])
    with pytest.raises(ValueError, match=match):
        call(model)
