"""The classic peer: a small LM of the same tokenizer drafts with its own KV cache.

The draft model keeps a cache of the committed tokens; each round it first
rolls back to the longest prefix it shares with the committed sequence (so
rejected drafts simply vanish), feeds any committed tokens it has not seen,
then decodes a greedy chain of `depth` tokens one step at a time. With
`width` > 1 every chain node also gets its draft model's next-best tokens as
sibling leaves: a tree of 1 + depth * width nodes for the same `depth` draft
steps, verified in one target forward. Children are the draft's top-k, so the
verification core uses target-sample matching under sampling (lossless).
"""

from __future__ import annotations

import torch

from ..models.runner import TargetRunner
from ..tree.builders import build_chain_with_siblings
from ..tree.draft_tree import DraftTree


class TokenizerMismatchError(ValueError):
    """The draft model does not share the target's tokenizer."""


def check_same_tokenizer(target_lm, draft_lm) -> None:
    from .heads.block import tokenizer_fingerprint

    a, b = tokenizer_fingerprint(target_lm.tokenizer), tokenizer_fingerprint(draft_lm.tokenizer)
    if a != b:
        raise TokenizerMismatchError(
            f"draft model '{draft_lm.name}' has another tokenizer than target '{target_lm.name}' "
            f"(vocab fingerprints {b} vs {a}): a draft model must share the target's tokenizer")


class DraftModelDrafter:
    tap_layers: tuple[int, ...] = ()

    def __init__(self, draft_lm, depth: int = 5, width: int = 1, max_len: int = 4096, vocab_size: int | None = None,
                 name: str = "draft-model"):
        if depth < 1 or width < 1:
            raise ValueError("draft-model needs depth >= 1 and width >= 1")
        self.lm, self.depth, self.width, self.name = draft_lm, depth, width, name
        self.vocab = vocab_size or draft_lm.config.vocab_size  # target vocab: draft rows are cut/padded to it
        self.runner = TargetRunner(draft_lm.model, max_len=min(max_len, draft_lm.config.max_position))
        self.cached: list[int] = []  # tokens whose K/V sit in the draft cache, in order

    def begin(self, prompt_ids, prompt_taps):
        self.runner.reset()
        self.cached = []

    def update(self, new_tokens, new_taps):
        pass  # propose() re-synchronises on the committed tokens themselves

    def _sync(self, committed: list[int]) -> None:
        """Make the draft cache hold exactly `committed` (all but the root)."""
        n = 0
        limit = min(len(self.cached), len(committed))
        while n < limit and self.cached[n] == committed[n]:
            n += 1
        self.runner.lengths[0] = n
        self.runner._last_tree_size[0] = 0
        if n < len(committed):
            self.runner.prefill(committed[n:])
        self.cached = list(committed)

    def _step(self, token: int) -> torch.Tensor:
        """Feed one token to the draft model; its log-probs over the target's vocab (rows beyond it cut)."""
        self.cached.append(token)
        return torch.log_softmax(self.runner.step(token)[: self.vocab].float(), -1)

    @torch.inference_mode()
    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        root = tokens[-1]
        # A small budget keeps depth (what a good draft earns most from) and drops siblings first.
        room = self.runner.max_len - len(tokens)
        depth = max(0, min(self.depth, budget - 1, room))
        width = max(1, min(self.width, (budget - 1) // max(1, depth)))
        if depth == 0:
            return DraftTree.chain([root])
        self._sync(tokens[:-1])
        tree = build_chain_with_siblings(root, self._step(root), self._step, depth, width)
        tree.meta["drafter"] = self.name
        return tree
