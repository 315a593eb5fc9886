"""A compact Llama / Qwen2 / Qwen3 decoder forward (gpt-fast style).

One forward serves prefill, plain decoding and tree verification: the caller
gives token ids, their RoPE positions, the cache slot where their K/V go, and a
boolean visibility mask over cache slots. Projections are fused (qkv, gate|up)
because on a CPU the per-op overhead of a 135M model is a large share of a
decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; low-precision inputs are normalised in fp32 inside it.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        out = (self.nh + 2 * self.nkv) * self.hd
        self.wqkv = nn.Linear(cfg.hidden_size, out, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, kv_len):
        b, t, _ = x.shape
        qkv = self.wqkv(x)
        nq = self.nh + self.nkv
        qk, v = qkv.split([nq * self.hd, self.nkv * self.hd], dim=-1)
        qk = qk.view(b, t, nq, self.hd)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, : self.nh]), self.k_norm(qk[:, :, self.nh :])], dim=2)
        # RoPE on q and k together; `sin` carries rotate_half's sign, so a roll replaces chunk/neg/cat.
        qk = qk.transpose(1, 2)
        qk = qk * cos + torch.roll(qk, self.hd // 2, dims=-1) * sin
        q, k = qk.split([self.nh, self.nkv], dim=1)
        v = v.view(b, t, self.nkv, self.hd).transpose(1, 2)
        if slots is None:  # contiguous write shared by the batch (the common single-stream case)
            start = kv_len - t
            k_cache[:, :, start:kv_len] = k
            v_cache[:, :, start:kv_len] = v
        else:  # per-sequence slots: slots (B, T)
            bidx = torch.arange(b).unsqueeze(1)
            k_cache[bidx, :, slots] = k.transpose(1, 2)
            v_cache[bidx, :, slots] = v.transpose(1, 2)
        keys, vals = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.inter, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, kv_len):
        x = x + self.attn(self.attn_norm(x), cos, sin, k_cache, v_cache, slots, mask, kv_len)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for (B, T) positions, shaped (B, 1, T, head_dim); tables built in fp64."""
        need = int(positions.max()) + 1
        c = self._rope_cache
        if c is None or c[0].shape[0] < need or c[0].dtype != dtype or c[0].device != positions.device:
            n = max(need, self.cfg.max_position, 1)
            hd = self.cfg.head_dim
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            half = hd // 2
            sign = torch.cat([-torch.ones(half, dtype=torch.float64), torch.ones(half, dtype=torch.float64)])
            dev = positions.device
            self._rope_cache = (emb.cos().to(dev, dtype), (emb.sin() * sign).to(dev, dtype))
        cos, sin = self._rope_cache
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_len: int,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        taps: tuple[int, ...] = (),
        logits_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the decoder over `tokens` (B, T).

        K/V go to cache slots [kv_len - T, kv_len) (or `slots`); attention covers
        slots [0, kv_len) under `mask` (B, 1, T, kv_len) bool, None = all visible.
        Returns logits (B, T, V) (or only `logits_rows` of T) and the residual
        stream after each layer in `taps`, concatenated: (B, T, len(taps)*H).
        """
        x = self.embed(tokens)
        cos, sin = self.rope(positions, x.dtype)
        tapped = []
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_cache[i], v_cache[i], slots, mask, kv_len)
            if i in taps:
                tapped.append(x)
        if logits_rows is not None:
            x = x[:, logits_rows]
        head = getattr(self, "lm_head_packed", None) or self.lm_head
        logits = head(self.norm(x))
        return logits, (torch.cat(tapped, dim=-1) if tapped else None)


class PackedLinear(nn.Module):
    """A bf16 Linear whose weight is pre-packed in oneDNN's blocked layout.

    On CPU the stock bf16 GEMV streams weights at ~11 GB/s; the packed layout
    reaches ~19 GB/s (measured on the 2-core dev machine), and decoding is
    bound by exactly that weight stream. Inference only: no autograd.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def pack_for_cpu(model: "Transformer") -> bool:
    """Swap the decoder's bf16 Linears for oneDNN-packed ones where supported; returns whether it did."""
    if next(model.parameters()).dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(nn.Linear(8, 8, bias=True).to(torch.bfloat16))
        probe(torch.zeros(1, 8, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        return False
    for layer in model.layers:
        layer.attn.wqkv = PackedLinear(layer.attn.wqkv)
        layer.attn.wo = PackedLinear(layer.attn.wo)
        layer.mlp.w13 = PackedLinear(layer.mlp.w13)
        layer.mlp.w2 = PackedLinear(layer.mlp.w2)
    # lm_head keeps its plain weight too: draft heads share it (frozen) with the target.
    model.lm_head_packed = PackedLinear(model.lm_head)
    return True


def load_hf_state_dict(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face-named weights into the fused layout, failing loudly on gaps."""
    cfg = model.cfg
    own: dict[str, torch.Tensor] = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    own["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = f"layers.{i}.attn."
        own[a + "wqkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        if cfg.attention_bias:
            own[a + "wqkv.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        own[a + "wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            own[a + "q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            own[a + "k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        m = f"layers.{i}.mlp."
        own[m + "w13.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        own[m + "w2.weight"] = sd[p + "mlp.down_proj.weight"]
        own[f"layers.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        own[f"layers.{i}.mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    dt = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dt) for k, v in own.items()}, strict=True)
    if cfg.tie_embeddings:  # share one tensor instead of holding the vocab matrix twice
        model.lm_head.weight = model.embed.weight
