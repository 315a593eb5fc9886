"""Cutting emitted tokens at EOS / length limits, and stop strings.

A verify round can emit several tokens, possibly past an EOS the tree contained;
everything after the first EOS (or past the token budget) must be dropped, or the
output would differ from plain sampling, which stops there.
"""

from __future__ import annotations

import torch


def truncate_emitted(tokens: list[int], eos_ids: set[int], remaining: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS, at most `remaining` of them.

    finished is True when an EOS was kept or the budget is used up.
    """
    out = []
    for t in tokens[: max(remaining, 0)]:
        out.append(t)
        if t in eos_ids:
            return out, True
    return out, len(out) >= remaining


def truncate_emitted_batch(
    tokens: torch.Tensor, eos_ids: set[int], remaining: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched `truncate_emitted` on (B, L) tokens, -1 padded -> (kept lengths (B,), finished (B,))."""
    B, L = tokens.shape
    n = (tokens >= 0).sum(1)
    remaining = torch.as_tensor(remaining, device=tokens.device).expand(B).clamp_min(0)
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    pos = torch.arange(L, device=tokens.device)
    first_eos = torch.where(is_eos, pos, L).amin(1) if L else torch.zeros_like(n)
    keep = torch.minimum(torch.minimum(n, first_eos + 1), remaining)
    finished = (first_eos < keep) | (keep >= remaining)
    return keep, finished


class StopStrings:
    """Finds the earliest stop string in decoded text (for the CLI / server)."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]

    def find(self, text: str, start: int = 0) -> int | None:
        """Index in `text` where the earliest stop string begins (search from `start`), or None."""
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def safe_len(self, text: str) -> int:
        """How much of `text` can be streamed: it cannot be the start of a stop string."""
        stop_at = self.find(text)
        if stop_at is not None:
            return stop_at
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold
