"""EAGLE-3-style autoregressive draft head: the AR baseline the parallel heads are compared with.

Fused target taps (k layers -> FC -> RMSNorm) give a feature g_t per committed
position. One decoder layer reads [embedding of the next token ; feature]
(2H -> H) and its output h_t, through the target's final norm-free LM head,
predicts the token after that. Drafting is autoregressive: the head's own
output h replaces the target feature for every drafted position, so a chain of
depth D costs D - 1 small head steps after the first.

Positions (as at inference): committed tokens x_0..x_n (x_n = the root, no taps
yet). State t (0 <= t < n) reads (x_{t+1}, g_t) and predicts x_{t+2}; the
state at n-1 therefore predicts the first drafted token. Drafted step j >= 2
sits at position n+j-2, reads (d_{j-1}, h of step j-1) and attends to the
committed states plus its own chain.

Training-time test (EAGLE-3): step 1 is one causal pass over the sequence;
step j >= 2 re-runs the layer at every position t on (x_{t+j}, h^{(j-1)}_t),
attending to step-1 states at positions <= t and to its own steps 2..j at t, so
the head learns on its own features exactly as it will draft. The tree is the
same `DraftTree` everyone uses; the block heads' config and layers are reused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...models.transformer import RMSNorm
from .block import BlockDraftHead, BlockHeadConfig


class EagleHead(BlockDraftHead):
    """Reuses the block head's fuse / layers / norm / save / load, and its root-row projection
    [emb; state] -> H as the step input of every autoregressive step."""

    def __init__(self, cfg: BlockHeadConfig):
        super().__init__(cfg)
        h = cfg.target_hidden
        self.emb_norm = RMSNorm(h, cfg.rms_eps)
        self.feat_norm = RMSNorm(h, cfg.rms_eps)

    def step_input(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return self.root_in(torch.cat([self.emb_norm(emb), self.feat_norm(feat)], dim=-1))

    def run(self, x: torch.Tensor, positions: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]],
            mask: torch.Tensor | None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Rows x (B, T, H) at positions (B, T) over `past` K/V per layer; returns (normed out, rows' own K/V)."""
        cos, sin = self.rope(positions, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        own = []
        for layer, (pk, pv) in zip(self.layers, past):
            own.append(layer.attn.kv(layer.attn_norm(x), cos, sin))
            x = layer(x, cos, sin, pk, pv, mask)
        return self.norm(x), own

    def logits(self, h: torch.Tensor, lm_w: torch.Tensor) -> torch.Tensor:
        """Draft logits of `run`'s states (already final-normed) over the target's rows lm_w."""
        return F.linear(h, lm_w.to(h.dtype))

    def empty_kv(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        e = like.new_zeros(like.shape[0], self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [(e, e) for _ in self.layers]


def eagle_train_logits(head, taps: torch.Tensor, ids: list[int], embed_w: torch.Tensor,
                       lm_w: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Training-time test over one sequence: logits (T-1, V) per step j = 1..steps.

    Row t of step j predicts x_{t+j+1}, i.e. the target's distribution at position t+j.
    taps: (T, k*H) target taps of positions 0..T-1 (the last token's row is unused).
    """
    dev = taps.device
    t = len(ids) - 1  # states 0..T-2 read x_{t+1}
    feats = head.fuse(taps[:t].unsqueeze(0))  # (1, t, H)
    tok = torch.tensor(ids, device=dev)
    pos = torch.arange(t, device=dev).unsqueeze(0)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    x = head.step_input(F.embedding(tok[1 : t + 1], embed_w).unsqueeze(0).to(feats.dtype), feats)
    h, k1 = head.run(x, pos, head.empty_kv(feats), causal.view(1, 1, t, t))
    outs = [head.logits(h[0], lm_w)]
    past = k1
    eye = torch.eye(t, dtype=torch.bool, device=dev)
    for j in range(2, steps + 1):
        nxt = torch.cat([tok[j : t + j], tok.new_full((max(0, t + j - len(ids)),), 0)])[:t]
        x = head.step_input(F.embedding(nxt, embed_w).unsqueeze(0).to(h.dtype), h)
        mask = torch.cat([causal] + [eye] * (j - 1), dim=1).view(1, 1, t, j * t)
        h, own = head.run(x, pos + (j - 1), past, mask)
        past = [(torch.cat([pk, ok], 2), torch.cat([pv, ov], 2)) for (pk, pv), (ok, ov) in zip(past, own)]
        outs.append(head.logits(h[0], lm_w))
    return outs
