"""Prompt-lookup / n-gram drafting: continue the context the way it continued before.

Training-free and free to run. The tree form merges the continuations that
follow several earlier matches into a trie, so siblings are distinct by
construction and the most recent, longest match is tried first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tree.draft_tree import DraftTree


class NGramDrafter:
    tap_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_depth: int = 8, tree: bool = True,
                 max_matches: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.tree, self.max_matches = max_depth, tree, max_matches
        self.name = "ngram" if tree else "ngram-chain"

    def begin(self, prompt_ids, prompt_taps):
        pass

    def update(self, new_tokens, new_taps):
        pass

    def continuations(self, tokens: list[int]) -> list[list[int]]:
        """Continuations after earlier occurrences of the context's suffix, best first."""
        arr = np.asarray(tokens, dtype=np.int64)
        n_ctx = arr.size
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            pattern = arr[n_ctx - n :]
            windows = np.lib.stride_tricks.sliding_window_view(arr[: n_ctx - 1], n)
            hits = np.nonzero((windows == pattern).all(axis=1))[0]
            for start in hits[::-1]:  # most recent first
                cont = arr[start + n : start + n + self.max_depth].tolist()
                if cont:
                    found.append(cont)
                if len(found) >= self.max_matches:
                    return found
            if found and not self.tree:
                break
        return found

    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        conts = self.continuations(tokens)
        if not self.tree:
            conts = conts[:1]
        toks, parents, depths = [tokens[-1]], [-1], [0]
        children: list[dict[int, int]] = [{}]
        for cont in conts:
            node = 0
            for t in cont:
                if t in children[node]:
                    node = children[node][t]
                    continue
                if len(toks) >= budget:
                    break
                toks.append(t)
                parents.append(node)
                depths.append(depths[node] + 1)
                children.append({})
                children[node][t] = len(toks) - 1
                node = len(toks) - 1
        return DraftTree(
            tokens=torch.tensor(toks, dtype=torch.long),
            parents=torch.tensor(parents, dtype=torch.long),
            depths=torch.tensor(depths, dtype=torch.long),
            child_mode="topk",
        )
