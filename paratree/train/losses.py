"""Draft-head losses. All take draft logits and target logits of shape (N, D, V) and a (N, D) row mask.

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
