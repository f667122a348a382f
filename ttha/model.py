"""Byte-level decoder-only MoE LM and its experts (16-bit, group-wise int4/int2, fp8).

Routing is pluggable: each MoE layer asks its router for (weights [T, k], indices [T, k]) from
fp32 gate logits. The default is plain softmax top-k (pretraining); the test-time phase plugs in
ttha.routing.AdaptiveRouter with MoELM.set_router. Quantization is post-training:
quantize_experts replaces trained 16-bit experts in place, so a cheap expert really costs quality.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttha import kernels
from ttha.kernels import quant

Router = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits), renormalised over the k chosen."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = probs.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), indices


def needs_grad(t: torch.Tensor) -> bool:
    """Whether a call on t builds an autograd graph (test-time training): the Triton kernels and _scaled_mm
    write outside autograd, so such calls take the torch paths."""
    return t.requires_grad and torch.is_grad_enabled()


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [..., vocab] against the next bytes [...], in fp32 (bf16 logits round off the
    small probabilities the loss is made of)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


class SimpleExpert(nn.Module):
    """16-bit FFN expert: w2 · gelu(w1 · x)."""

    bits = 16

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def _cpu_cached(module: nn.Module, name: str, dtype: torch.dtype, make) -> torch.Tensor:
    """The dequantized weight `name` of a quantized expert, made once per dtype on a CPU. A CPU run measures
    quality (the values are exactly the quantized ones); its time stands in for the GPU's, where costs come
    from the cost model, so re-dequantizing every call would only make cheap experts look slow."""
    cache = module.__dict__.setdefault("_cpu_weights", {})
    if (name, dtype) not in cache:
        cache[(name, dtype)] = make()
    return cache[(name, dtype)]


class QuantizedExpert(nn.Module):
    """Group-wise 4/2-bit expert, dequantized on the fly: the fused Triton kernel on CUDA outside autograd,
    else the torch reference (dequantize, then F.linear)."""

    def __init__(self, q1: quant.QuantizedWeight, q2: quant.QuantizedWeight):
        super().__init__()
        self.bits, self.group_size = q1.bits, q1.group_size
        self.shapes = (q1.shape, q2.shape)
        for name, q in (("w1", q1), ("w2", q2)):  # buffers: they move with .to() and are not trained
            self.register_buffer(f"{name}_packed", q.packed)
            self.register_buffer(f"{name}_scales", q.scales)
            self.register_buffer(f"{name}_mins", q.mins)

    @classmethod
    def from_dense(cls, expert: SimpleExpert, bits: int, group_size: int) -> "QuantizedExpert":
        return cls(quant.quantize(expert.w1.weight.detach(), bits, group_size),
                   quant.quantize(expert.w2.weight.detach(), bits, group_size))

    def qweight(self, name: str) -> quant.QuantizedWeight:
        shape = self.shapes[0] if name == "w1" else self.shapes[1]
        return quant.QuantizedWeight(getattr(self, f"{name}_packed"), getattr(self, f"{name}_scales"),
                                     getattr(self, f"{name}_mins"), self.bits, self.group_size, shape)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        qw = self.qweight(name)
        # Test-time training backpropagates through the expert: the Triton kernel writes outside autograd (and
        # tunes itself on its first eager call in each new bucket of token counts), so autograd's path dequantizes.
        if kernels.use_triton(x) and not needs_grad(x):
            return kernels.dequant_linear(x, qw)
        if x.device.type == "cpu":  # a CPU stands in for the GPU: keep the dequantized weight (same values)
            return F.linear(x, _cpu_cached(self, name, x.dtype, lambda: quant.dequantize(qw, x.dtype)))
        return F.linear(x, quant.dequantize(qw, x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(F.gelu(self._linear(x, "w1")), "w2")


def _fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise scaled e4m3: t ≈ q * scale, scale [rows, 1] fp32."""
    scale = (t.detach().float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


class FP8Expert(nn.Module):
    """fp8 e4m3 expert with per-row weight scales and per-token activation scales.
    torch._scaled_mm on GPUs with FP8 (compute capability >= 8.9) outside autograd; elsewhere the same math by
    casting to float8 and back (exact up to accumulation order)."""

    bits = 8

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        for name, w in (("w1", w1), ("w2", w2)):
            q, s = _fp8_rows(w)
            self.register_buffer(f"{name}_fp8", q)
            self.register_buffer(f"{name}_scale", s.reshape(1, -1))  # [1, N] for _scaled_mm's scale_b

    @classmethod
    def from_dense(cls, expert: SimpleExpert) -> "FP8Expert":
        return cls(expert.w1.weight.detach(), expert.w2.weight.detach())

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, sw = getattr(self, f"{name}_fp8"), getattr(self, f"{name}_scale")
        xq, sx = _fp8_rows(x)
        grad = needs_grad(x)  # _scaled_mm has no backward
        if not grad and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9):
            m = x.shape[0]
            pad = (-m) % 16  # _scaled_mm wants dimensions in multiples of 16
            if pad:
                xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
                sx = F.pad(sx, (0, 0, 0, pad), value=1.0)
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
            return y[:m].to(x.dtype)
        def dequantized() -> torch.Tensor:
            return w.float() * sw.reshape(-1, 1)

        wf = _cpu_cached(self, name, torch.float32, dequantized) if x.device.type == "cpu" else dequantized()
        xd = xq.float() * sx
        if grad:  # straight through: rounding to fp8 has no gradient, so x's passes as if unrounded
            xd = x.float() + (xd - x.float()).detach()
        return (xd @ wf.t()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(F.gelu(self._linear(x, "w1")), "w2")


class MoEFFN(nn.Module):
    """Top-k mixture of experts. Records the Switch-style load-balancing loss after each forward."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, layer_idx: int):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SimpleExpert(d_model, d_ff) for _ in range(n_experts))
        self.top_k, self.layer_idx = top_k, layer_idx
        self.router: Router | None = None  # set via object.__setattr__: never a submodule
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        logits = self.gate(xf).float()
        if self.router is None:
            weights, indices = softmax_topk(logits, self.top_k)
        else:
            weights, indices = self.router(logits, self.layer_idx)
        n_exp = len(self.experts)
        flat = indices.reshape(-1)
        counts = torch.bincount(flat, minlength=n_exp)
        if self.training:
            frac = counts.float() / flat.numel()
            self.aux_loss = n_exp * (frac * torch.softmax(logits, -1).mean(0)).sum()
        # Group token slots by expert: one gather and one scatter-add per expert, no per-token loop.
        order = flat.argsort()
        token = order // self.top_k
        w = weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(xf)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                tok = token[start:start + n]
                out.index_add_(0, tok, (self.experts[e](xf[tok]) * w[start:start + n]).to(out.dtype))
                start += n
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = MoEFFN(d, cfg.d_ff, cfg.n_experts, cfg.top_k, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.moe(self.ln2(x))


class MoELM(nn.Module):
    """Byte-level decoder-only MoE language model: idx [B, S] int64 -> logits [B, S, vocab]."""

    def __init__(self, cfg):
        super().__init__()
        self.vocab_size, self.max_seq_len = int(cfg.vocab_size), int(cfg.max_seq_len)
        self.tok = nn.Embedding(self.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(self.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoEFFN]:
        return [b.moe for b in self.blocks]

    @property
    def n_experts(self) -> int:
        return len(self.moe_layers[0].experts)

    @property
    def aux_loss(self) -> torch.Tensor:
        return sum(m.aux_loss for m in self.moe_layers) / len(self.moe_layers)

    def set_router(self, router: Router | None) -> None:
        for m in self.moe_layers:
            object.__setattr__(m, "router", router)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_expert(dense: SimpleExpert, bits: int, group_size: int) -> nn.Module:
    if bits == 16:
        return dense
    if bits == 8:
        return FP8Expert.from_dense(dense)
    if bits in (2, 4):
        return QuantizedExpert.from_dense(dense, bits, group_size)
    raise ValueError(f"bits={bits}: must be one of 2, 4, 8, 16")


def cycled_bits(bits, n_experts: int) -> list[int]:
    """Each expert's bits under a mix: expert i gets bits[i % len(bits)]."""
    return [int(bits[i % len(bits)]) for i in range(n_experts)]


@torch.no_grad()
def quantize_experts(model: MoELM, bits: list[int], group_size: int) -> MoELM:
    """Post-training: expert i of every layer gets bits[i % len(bits)] (16 keeps the trained expert)."""
    for layer in model.moe_layers:
        for i, (dense, b) in enumerate(zip(layer.experts, cycled_bits(bits, len(layer.experts)))):
            if isinstance(dense, SimpleExpert):
                layer.experts[i] = make_expert(dense, b, group_size)
    return model


def expert_bits(model: MoELM) -> list[int]:
    return [int(e.bits) for e in model.moe_layers[0].experts]
