"""The EAGLE-3 head as the engines define it, so `paratree export --format eagle3` writes it as the
same function (SpecForge `LlamaForCausalLMEagle3` = vLLM `Eagle3LlamaForCausalLM`; llama.cpp
`--spec-type draft-eagle3`). Forward (docs/export_formats_notes.md §1.2, read from SpecForge
`specforge/modeling/draft/llama3_eagle.py`, vLLM `llama_eagle3.py` and llama.cpp `src/models/eagle3.cpp`):

    g = fc(cat(taps))                                   raw taps, no norm
    x = cat(input_layernorm(emb(token)), hidden_norm(g))   2H: embedding first
    h = g + o_proj(attn(q/k/v_proj(x)))                 RoPE, no q/k norms; the residual is raw g
    h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                           its own LM head over the draft vocab (d2t)

and the PRE-norm h is the next autoregressive step's g. Positions and training-time test are
paratree's EAGLE head's (heads/eagle.py); what differs from it is exactly the list above (paratree's
own head projects [emb; state] to H with a learned matrix, normalises q/k and feeds the normed
state back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models.transformer import MLP, RMSNorm, rotate_half
from .block import BlockDraftHead, BlockHeadConfig


class Eagle3Layer(nn.Module):
    """EAGLE-3's one decoder layer: attention over the 2H input, residual from the fused state."""

    def __init__(self, cfg: BlockHeadConfig):
        super().__init__()
        h = cfg.target_hidden
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_eps)
        self.mlp = MLP(h, cfg.intermediate_size)

    def kv(self, x2: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x2.shape
        k = self.k_proj(x2).view(b, t, self.nkv, self.hd).transpose(1, 2)
        return k * cos + rotate_half(k) * sin, self.v_proj(x2).view(b, t, self.nkv, self.hd).transpose(1, 2)

    def forward(self, x2, resid, cos, sin, past_k, past_v, mask):
        b, t, _ = x2.shape
        q = self.q_proj(x2).view(b, t, self.nh, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k, v = self.kv(x2, cos, sin)
        y = F.scaled_dot_product_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), attn_mask=mask,
                                           enable_gqa=self.nh != self.nkv)
        h = resid + self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))
        return h + self.mlp(self.post_attention_layernorm(h)), (k, v)


class Eagle3Head(BlockDraftHead):
    """Keeps the block head's config, fc, hidden_norm, norm, d2t, RoPE table and save/load; its one
    layer, step input and LM head are EAGLE-3's. Drafted by `EagleDrafter`, trained by training-time
    test (`eagle_train_logits`), as paratree's own EAGLE head."""

    def __init__(self, cfg: BlockHeadConfig):
        if cfg.num_layers != 1 or cfg.root_in or cfg.tap_norm:
            raise ValueError("an EAGLE-3 head has one layer, raw taps into fc and no root projection "
                             "(num_layers: 1, tap_norm: false, root_in: false)")
        super().__init__(cfg)
        h = cfg.target_hidden
        self.mask_emb = None  # autoregressive: no mask rows
        self.layers = nn.ModuleList([Eagle3Layer(cfg)])
        self.input_layernorm = RMSNorm(h, cfg.rms_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab or cfg.vocab_size, bias=False)

    def lm_weight(self, target_lm_weight: torch.Tensor) -> torch.Tensor:
        return self.lm_head.weight  # its own, trained (initialised from the target's rows d2t)

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        return self.fc(taps)

    def step_input(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """[input_layernorm(emb) ; hidden_norm(g) ; g]: the 2H attention input, then the residual."""
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(feat), feat], dim=-1)

    def run(self, x: torch.Tensor, positions: torch.Tensor, past, mask):
        """Step inputs x (B, T, 3H) at positions (B, T) over `past` K/V; returns (pre-norm h, rows' own K/V)."""
        h2 = 2 * self.cfg.target_hidden
        cos, sin = self.rope(positions, x.dtype)
        (pk, pv), layer = past[0], self.layers[0]
        h, own = layer(x[..., :h2], x[..., h2:], cos.unsqueeze(1), sin.unsqueeze(1), pk, pv, mask)
        return h, [own]

    def logits(self, h: torch.Tensor, lm_w: torch.Tensor | None = None) -> torch.Tensor:
        """lm_head(norm(h)) with its own LM head (`lm_w` is not used)."""
        return self.lm_head(self.norm(h))

    def empty_kv(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        e = like.new_zeros(like.shape[0], self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [(e, e)]
