"""The one protocol every drafter implements, trained heads and training-free alike.

A drafter sees the committed tokens (the last one is the root of the next tree)
and, if it asks for them, the target's hidden-state taps of committed positions;
it returns a DraftTree. The engine never needs to know which family it drives.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..tree.draft_tree import DraftTree


@runtime_checkable
class Drafter(Protocol):
    name: str
    # Target layer ids whose residual stream the drafter reads (empty: none).
    tap_layers: tuple[int, ...]

    def begin(self, prompt_ids: list[int], prompt_taps: torch.Tensor | None) -> None:
        """Start a new sequence. `prompt_taps` covers prompt_ids[:-1] (the root has no taps yet)."""

    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        """Draft a tree rooted at tokens[-1] with at most `budget` nodes (root included)."""

    def update(self, new_tokens: list[int], new_taps: torch.Tensor | None) -> None:
        """Tokens that entered the target cache this round (root + accepted) and their taps."""


class NoDrafter:
    """Plain decoding through the same loop: the tree is just the root."""

    name = "plain"
    tap_layers: tuple[int, ...] = ()

    def begin(self, prompt_ids, prompt_taps):
        pass

    def propose(self, tokens, budget):
        return DraftTree.chain([tokens[-1]])

    def update(self, new_tokens, new_taps):
        pass
