"""The training side of draft heads: anchors and mask blocks, the block-head forward at anchors, losses.

Losses take draft logits and target logits of shape (N, D, V) and a (N, D) row mask.

JetSpec: temperature-scaled forward KL to the target's full next-token
distribution at every block position (no position decay needed: the causal
head's deep rows condition on the shallow ones). DFlash: hard-label cross
entropy with exponential position decay exp(-(d-1)/gamma) that favours the
shallow depths a bidirectional head can actually get right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .block import BlockDraftHead


def forward_kl(draft: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0):
    """Sum over valid rows of T^2 * KL(softmax(target/T) || softmax(draft/T))."""
    t = temperature
    logp_t = F.log_softmax(target.float() / t, dim=-1)
    logp_d = F.log_softmax(draft.float() / t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_d)).sum(-1)
    return (kl * mask).sum() * (t * t)


def decayed_ce(draft: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, gamma: float = 7.0):
    """Sum over valid rows of exp(-(d-1)/gamma) * CE(draft, argmax target) at depth d = 1..D."""
    labels = target.argmax(-1)
    ce = F.cross_entropy(draft.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    d = torch.arange(labels.shape[1], dtype=torch.float32, device=labels.device)
    w = torch.exp(-d / gamma) if gamma > 0 else torch.ones_like(d)
    return (ce * w * mask).sum()


def tv_rows(draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row TV(p_draft, p_target) = 1/2 |p_d - p_t|_1 (1 - TV is the acceptance rate)."""
    return 0.5 * (F.softmax(draft.float(), -1) - F.softmax(target.float(), -1)).abs().sum(-1)


def total_variation(draft: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Sum over valid rows of TV(p_draft, p_target)."""
    return (tv_rows(draft, target) * mask).sum()


def teacher_forced_tau(draft: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Expected greedy chain length (+1 bonus) if the draft's argmax chain were verified.

    Per block: count leading depths where draft argmax == target argmax. A cheap,
    honest proxy tracked during training; the benchmark measures the real τ.
    """
    keep = mask[:, 0] > 0  # rows drafted from the root (not prompt rows / un-masked-prefix blocks)
    match = (draft[keep].argmax(-1) == target[keep].argmax(-1)) & mask[keep].bool()
    lead = match.long().cumprod(dim=1).sum(dim=1).float()
    return float(lead.mean() + 1.0) if lead.numel() else math.nan


LOSSES = {"kl": forward_kl, "ce_decay": decayed_ce, "tv": total_variation}


def dspark_loss(draft: torch.Tensor, conf_logit: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                ce_weight: float = 0.1, tv_weight: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """DSpark's mix: 0.1 CE + 0.9 TV for the drafts, + BCE of the confidence head toward the
    realised acceptance 1 - TV (detached: the confidence learns to predict, not to move, it).
    Returns (summed loss, per-row 1 - TV)."""
    tv = tv_rows(draft, target)
    ce = F.cross_entropy(draft.float().flatten(0, -2), target.argmax(-1).flatten(), reduction="none").view(tv.shape)
    accept = (1.0 - tv).detach().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(conf_logit.float(), accept, reduction="none")
    return ((ce_weight * ce + tv_weight * tv + bce) * mask).sum(), accept


def sample_anchors(n_tokens: int, prompt_len: int, n: int, gen: torch.Generator) -> list[int]:
    """Anchor positions whose next token exists, from the last prompt token on (the first draft root)."""
    lo, hi = max(0, prompt_len - 1), n_tokens - 2
    if hi < lo:
        return []
    cand = torch.arange(lo, hi + 1)
    if cand.numel() > n:
        cand = cand[torch.randperm(cand.numel(), generator=gen)[:n]].sort().values
    return cand.tolist()


def build_blocks(ids: list[int], anchors: list[int], depth: int, unmask_prob: float, gen: torch.Generator):
    """Block tokens (A, D) with -1 = MASK, and a (A, D) mask of supervised rows (row i -> depth i+1).

    With unmask_prob, a block gets a real prefix t1..tm (m >= 1) so the causal head
    learns to condition on a branch; rows 0..m-1 then only feed row m onwards.
    """
    a_n = len(anchors)
    toks = torch.full((a_n, depth), -1, dtype=torch.long)
    sup = torch.zeros(a_n, depth)
    t = len(ids)
    for j, a in enumerate(anchors):
        toks[j, 0] = ids[a]
        valid = min(depth, t - 1 - a)
        m = 0
        if unmask_prob > 0 and valid > 1 and float(torch.rand((), generator=gen)) < unmask_prob:
            m = int(torch.randint(1, valid, (), generator=gen))
            toks[j, 1 : m + 1] = torch.tensor(ids[a + 1 : a + m + 1])
        sup[j, m:valid] = 1.0
    return toks, sup


def head_hidden(head: BlockDraftHead, taps: torch.Tensor, anchors: list[int], block_tokens: torch.Tensor,
                embed_w: torch.Tensor) -> torch.Tensor:
    """Final-normed head states (A, D, H) at depths 1..D for all anchors of one sequence in one head pass."""
    if head.cfg.shifted:  # the rows predicting depths 1..D are masks 1..D after the anchor
        block_tokens = F.pad(block_tokens, (0, 1), value=-1)
    a_n, bs = block_tokens.shape
    t = taps.shape[0]
    ctx = head.fuse(taps.unsqueeze(0))
    kv = head.context_kv(ctx, torch.arange(t, device=taps.device).unsqueeze(0))
    dev = taps.device
    anchor_t = torch.tensor(anchors, device=dev)
    # the state before each root (zero for a root at position 0, which has none)
    prev = torch.cat([ctx.new_zeros(1, 1, ctx.shape[-1]), ctx], dim=1)[:, anchor_t]
    x = head.block_embeddings(embed_w.to(ctx.dtype), block_tokens.view(1, -1), prev)
    pos = (anchor_t.view(-1, 1) + torch.arange(bs, device=dev).view(1, -1)).view(1, -1)
    ctx_visible = torch.arange(t, device=dev).view(1, -1) < anchor_t.view(-1, 1)
    mask = head.block_mask(a_n, ctx_visible).view(1, 1, a_n * bs, t + a_n * bs)
    # contiguous: a sliced (shifted) 3-D input makes F.linear a bmm that copies the LM head per anchor
    return head.depth_states(head.forward_blocks(x, pos, kv, mask).view(a_n, bs, -1)).contiguous()
