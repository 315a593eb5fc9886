"""DSpark head: a parallel block backbone + a cheap sequential (Markov) head + a confidence head.

The backbone is the DFlash-style bidirectional block head: one pass gives a state
h_k per depth. The sequential head adds a low-rank bias that depends on the
previous drafted token, so the chain stays coherent where parallel marginals
would stitch incompatible tokens together:

    logits_k(v) = lm(h_k)(v) + (W1[x_{k-1}] W2)(v)          (W1: vocab x r, W2: r x draft vocab)
    c_k        = sigmoid((w . [h_k ; W1[x_{k-1}]] + b) / T)  (trained toward 1 - TV(p_draft, p_target))

c_k estimates the chance that depth k is accepted given depth k-1 was, from
x_{k-1} and earlier only -- never from x_k -- which is what keeps a confidence
gate non-anticipating (verify/gate.py). T is fitted on held-out rows after
training (temperature scaling) and stored in the head config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .block import BlockDraftHead, BlockHeadConfig


class DSparkHead(BlockDraftHead):
    def __init__(self, cfg: BlockHeadConfig):
        super().__init__(cfg)
        r = int(cfg.extra.get("markov_rank", 64))
        n_out = cfg.draft_vocab or cfg.vocab_size
        self.markov_in = nn.Embedding(cfg.vocab_size, r)  # previous token (target id) -> rank-r code
        self.markov_out = nn.Linear(r, n_out, bias=False)
        self.conf = nn.Linear(cfg.target_hidden + r, 1)
        nn.init.zeros_(self.markov_out.weight)  # starts as the plain backbone

    @property
    def conf_temperature(self) -> float:
        return float(self.cfg.extra.get("conf_temperature", 1.0))

    def sequential(self, h: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                   prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (..., V) and confidence logits (...) for backbone states h (..., H) whose
        previous chain token (target id) is prev (...). `project` applies the (draft-vocab) LM
        head: the drafter passes its packed projection, the trainer a plain linear."""
        code = self.markov_in(prev).to(h.dtype)
        base = project(h)
        logits = base + self.markov_out(code)
        return logits, self.conf(torch.cat([h, code], dim=-1)).squeeze(-1)


def expected_calibration_error(conf: torch.Tensor, target: torch.Tensor, bins: int = 10) -> float:
    """ECE of predicted acceptance `conf` against realised acceptance `target` (both in [0, 1])."""
    conf, target = conf.flatten().double(), target.flatten().double()
    if conf.numel() == 0:
        return float("nan")
    idx = (conf * bins).long().clamp(max=bins - 1)
    err = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            err += float(sel.double().mean()) * abs(float(conf[sel].mean() - target[sel].mean()))
    return err


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The scalar T minimising BCE(sigmoid(logits / T), target) on held-out rows (grid + refine)."""
    logits, target = logits.flatten().double(), target.flatten().double()

    def loss(t: float) -> float:
        return float(F.binary_cross_entropy_with_logits(logits / t, target))

    grid = [2 ** (i / 8) for i in range(-24, 25)]
    best = min(grid, key=loss)
    fine = [best * 2 ** (i / 64) for i in range(-8, 9)]
    return min(fine, key=loss)
