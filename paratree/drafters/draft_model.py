"""The classic peer: a small LM of the same tokenizer drafts with its own KV cache.

The draft model keeps a cache of the committed tokens; each round it first
rolls back to the longest prefix it shares with the committed sequence (so
rejected drafts simply vanish), feeds any committed tokens it has not seen,
then decodes a greedy chain of up to `depth` tokens one step at a time,
stopping early once its own probability of a chain token drops below
`min_prob` (as HF assisted generation does). With
`width` > 1 every chain node also gets its draft model's next-best tokens as
sibling leaves: a tree of 1 + depth * width nodes for the same `depth` draft
steps, verified in one target forward. Children are the draft's top-k, so the
verification core uses target-sample matching under sampling (lossless).

Staged drafting (`lookup` > 0, the default): the sequential draft steps are what
a round costs (ten 0.5B steps outweigh one 1.5B verify). So the draft model first
checks a prompt-lookup continuation of up to `lookup` tokens in ONE forward,
keeps the prefix it would itself have drafted greedily, and steps on from there
(staged speculative decoding, Spector & Re 2023). The tree is the one sequential
drafting would build, up to floating-point near-ties; it just costs fewer steps
when the text repeats itself (code, edits, quoted context).
"""

from __future__ import annotations

import math

import torch

from ..models.runner import TargetRunner
from ..tree.builders import build_chain_with_siblings
from ..tree.draft_tree import DraftTree
from .heads.block import tokenizer_fingerprint
from .ngram import NGramDrafter


class TokenizerMismatchError(ValueError):
    """The draft model does not share the target's tokenizer."""


def check_same_tokenizer(target_lm, draft_lm) -> None:
    a, b = tokenizer_fingerprint(target_lm.tokenizer), tokenizer_fingerprint(draft_lm.tokenizer)
    if a != b:
        raise TokenizerMismatchError(
            f"draft model '{draft_lm.name}' has another tokenizer than target '{target_lm.name}' "
            f"(vocab fingerprints {b} vs {a}): a draft model must share the target's tokenizer")


class DraftModelDrafter:
    tap_layers: tuple[int, ...] = ()

    def __init__(self, draft_lm, depth: int = 5, width: int = 1, max_len: int = 4096, vocab_size: int | None = None,
                 name: str = "draft-model", min_prob: float = 0.0, lookup: int = 0):
        if depth < 1 or width < 1 or lookup < 0:
            raise ValueError("draft-model needs depth >= 1, width >= 1 and lookup >= 0")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError("draft-model min_prob must be in [0, 1)")
        self.lm, self.depth, self.width, self.name, self.min_prob = draft_lm, depth, width, name, min_prob
        self.lookup = NGramDrafter(tree=False, max_depth=lookup) if lookup else None
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
        self.runner.truncate(n)
        if n < len(committed):
            self.runner.prefill(committed[n:])
        self.cached = list(committed)

    def _step(self, token: int) -> torch.Tensor:
        """Feed one token to the draft model; its log-probs over the target's vocab (rows beyond it cut)."""
        self.cached.append(token)
        return torch.log_softmax(self.runner.step(token)[: self.vocab].float(), -1)

    def _staged_rows(self, tokens: list[int], depth: int) -> list[torch.Tensor]:
        """Feed the root plus the prompt-lookup guess in one forward; keep the greedy-agreeing prefix.

        Returns the draft's log-prob rows after the root and after each kept guess token
        (row i = the distribution that picks chain token i+1), with exactly those tokens
        committed to the draft cache, as if they had been fed one `_step` at a time.
        """
        root = tokens[-1]
        conts = self.lookup.continuations(tokens) if self.lookup is not None else []
        guess = conts[0][: depth - 1] if conts else []  # the last chain token is never fed
        if not guess:
            return [self._step(root)]
        out = self.runner.verify(DraftTree.chain([root, *guess]))
        rows = torch.log_softmax(out.logits[:, : self.vocab].float(), -1)
        keep = 0
        while keep < len(guess) and int(rows[keep].argmax()) == guess[keep]:
            if self.min_prob > 0 and float(rows[keep, guess[keep]]) < math.log(self.min_prob):  # the builder's rule
                break  # sequential drafting would stop the chain after this token: never fed
            keep += 1
        self.runner.commit(list(range(keep + 1)))
        self.cached.extend([root, *guess[:keep]])
        return list(rows[: keep + 1])

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
        rows = self._staged_rows(tokens, depth)
        fed = self.cached[len(tokens):]  # the guess tokens kept, in chain order

        def step(token: int) -> torch.Tensor:
            if fed and token == fed[0]:  # already fed in the staged forward: reuse its row
                fed.pop(0)
                return rows.pop(1)
            fed.clear()
            return self._step(token)

        tree = build_chain_with_siblings(root, rows[0], step, depth, width, min_prob=self.min_prob)
        tree.meta["drafter"] = self.name
        return tree
