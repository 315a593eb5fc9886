"""A trained head's tree with prompt-lookup continuations grafted on (`<head drafter>+ngram`).

Why: the two drafters fail in different places. A CPU-trained head has per-depth marginals
that fade after 2-3 tokens; prompt lookup is right for long runs exactly where text repeats
its context (code identifiers, numbers copied from a question) and silent elsewhere. One
tree holding both costs one verify forward, and the target picks whichever branch it agrees
with, so the output stays the target's own.

Grafted nodes need a probability for best-first ordering and cost-aware sizing. The head
has none for them, so each gets the hit rate lookup nodes of its depth have had so far in
this sequence: P(target picks it | parent reached), learned from earlier rounds only (the
tokens committed since the last proposal), so sizing never looks ahead.
"""

from __future__ import annotations

import copy
import math

import torch

from ..tree.draft_tree import DraftTree
from .ngram import NGramDrafter
from .registry import DrafterSpec


class LookupMergedDrafter:
    def __init__(self, base, max_depth: int = 8, max_matches: int = 3, prior: float = 0.5,
                 prior_weight: float = 2.0):
        self.base = base
        self.name = f"{base.name}+ngram"
        self.tap_layers = base.tap_layers
        self.lookup = NGramDrafter(tree=True, max_depth=max_depth, max_matches=max_matches)
        self.max_depth = max_depth
        self.prior, self.prior_weight = prior, prior_weight
        self.hits = [0.0] * (max_depth + 1)
        self.visits = [0.0] * (max_depth + 1)
        self._last: tuple[int, DraftTree, list[bool]] | None = None  # (context length, tree, grafted?)

    def __copy__(self) -> "LookupMergedDrafter":
        """Per-sequence copies (the server's) share the head's weights, never its sequence state."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.base = copy.copy(self.base)
        new.hits, new.visits, new._last = list(self.hits), list(self.visits), None
        return new

    def begin(self, prompt_ids, prompt_taps):
        self.base.begin(prompt_ids, prompt_taps)
        self.hits = [0.0] * (self.max_depth + 1)
        self.visits = [0.0] * (self.max_depth + 1)
        self._last = None

    def update(self, new_tokens, new_taps):
        self.base.update(new_tokens, new_taps)

    def rate(self, depth: int) -> float:
        d = min(depth, self.max_depth)
        return (self.hits[d] + self.prior_weight * self.prior) / (self.visits[d] + self.prior_weight)

    def _learn(self, tokens: list[int]) -> None:
        """Score the last proposal's grafted nodes against what the target committed since."""
        if self._last is None:
            return
        n_ctx, tree, grafted = self._last
        self._last = None
        chosen = tokens[n_ctx:]  # the target's tokens after the last root (accepted + bonus)
        if len(tokens) < n_ctx or not chosen:
            return
        toks, par, dep = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
        reached = [False] * len(toks)
        reached[0] = True
        for i in range(1, len(toks)):
            d = dep[i]
            if not reached[par[i]] or d > len(chosen):
                continue
            hit = toks[i] == chosen[d - 1]
            reached[i] = hit
            if grafted[i]:
                k = min(d, self.max_depth)
                self.visits[k] += 1
                self.hits[k] += hit

    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        self._learn(tokens)
        tree = self.base.propose(tokens, budget)
        conts = self.lookup.continuations(tokens) if budget > 1 else []
        if not conts:
            tree.meta["grafted"] = 0
            return tree
        if tree.cum_logp is None:
            raise ValueError(f"drafter '{self.base.name}' gives no draft probabilities to merge lookup into")
        toks, par, dep = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
        cum = tree.cum_logp.double().tolist()
        grafted = [False] * len(toks)
        kids: list[dict[int, int]] = [{} for _ in toks]
        for i in range(1, len(toks)):
            kids[par[i]][toks[i]] = i
        for cont in conts:
            node = 0
            for t in cont:
                nxt = kids[node].get(t)
                if nxt is None:
                    nxt = len(toks)
                    toks.append(t)
                    par.append(node)
                    dep.append(dep[node] + 1)
                    cum.append(cum[node] + math.log(self.rate(dep[node] + 1)))
                    grafted.append(True)
                    kids.append({})
                    kids[node][t] = nxt
                node = nxt
        if len(toks) == tree.num_nodes:  # lookup found nothing new: the head's own tree, nothing to learn
            tree.meta["grafted"] = 0
            return tree
        # Best-first order (a parent never ranks below its child: cum_logp only falls along a
        # path, and ties keep the earlier index), then the budget's best nodes.
        order = sorted(range(len(toks)), key=lambda i: (-cum[i], i))[:budget]
        new_index = {old: new for new, old in enumerate(order)}
        out = DraftTree(
            tokens=torch.tensor([toks[i] for i in order], dtype=torch.long),
            parents=torch.tensor([new_index[par[i]] if i else -1 for i in order], dtype=torch.long),
            depths=torch.tensor([dep[i] for i in order], dtype=torch.long),
            cum_logp=torch.tensor([cum[i] for i in order], dtype=torch.float64),
            child_mode="topk",
            meta={"builder": "lookup_merge", "grafted": sum(grafted[i] for i in order)},
        )
        self._last = (len(tokens), out, [grafted[i] for i in order])
        return out


def with_lookup(spec: DrafterSpec) -> DrafterSpec:
    """The registry entry "<spec.name>+ngram": `spec`'s tree with prompt-lookup continuations grafted on."""
    return DrafterSpec(f"{spec.name}+ngram", lambda ctx: LookupMergedDrafter(spec.build(ctx)), family=spec.family,
                       tree=True, fork=spec.fork, help=f"{spec.help}, with prompt-lookup continuations grafted on")
