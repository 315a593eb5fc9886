"""The one tree type every drafter produces and the target verifies.

Node 0 is the root: the last committed token, not yet in the target's KV cache.
Nodes are stored so that every parent precedes its children (any prefix of the
node list is itself a valid tree, which cost-aware sizing relies on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (N,) int64, tokens[0] = root token
    parents: torch.Tensor  # (N,) int64, parents[0] = -1, parents[i] < i
    depths: torch.Tensor  # (N,) int64, depths[0] = 0
    cum_logp: torch.Tensor | None = None  # (N,) float, cumulative draft log-prob (root 0)
    # q[i] = draft distribution over the next token at node i (the distribution
    # node i's children were chosen from). Needed by rejection-sampling acceptance.
    q: torch.Tensor | None = None  # (N, V) float or None
    # How children were chosen from q: "topk" (deterministic distinct), "sample"
    # (i.i.d. with replacement), "sample_wor" (without replacement).
    child_mode: str = "topk"
    meta: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())

    def ancestor_mask(self) -> torch.Tensor:
        """(N, N) bool: mask[i, j] is True iff j is i or an ancestor of i."""
        n = self.num_nodes
        mask = torch.zeros(n, n, dtype=torch.bool)
        par = self.parents.tolist()
        for i in range(n):
            mask[i, i] = True
            p = par[i]
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root to node i, inclusive."""
        out = []
        par = self.parents.tolist()
        while i >= 0:
            out.append(i)
            i = par[i]
        return out[::-1]

    def children(self) -> list[list[int]]:
        """children()[i] = child node indices of node i, in node (trial) order."""
        out: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                out[p].append(i)
        return out

    def sibling_ranks(self) -> torch.Tensor:
        """(N,) position of each node among its parent's children (root: 0).

        Builders append children best-first, so this is the drafter rank.
        """
        rank = torch.zeros(self.num_nodes, dtype=torch.long)
        for kids in self.children():
            for r, c in enumerate(kids):
                rank[c] = r
        return rank

    def validate(self) -> "DraftTree":
        """Raise ValueError unless the structural invariants hold."""
        n = self.num_nodes
        par, dep = self.parents.tolist(), self.depths.tolist()
        if n < 1 or len(par) != n or len(dep) != n:
            raise ValueError("tokens, parents and depths must be non-empty and of equal length")
        if par[0] != -1 or dep[0] != 0:
            raise ValueError("node 0 must be the root (parent -1, depth 0)")
        for i in range(1, n):
            if not 0 <= par[i] < i:
                raise ValueError(f"node {i}: parent {par[i]} must precede it")
            if dep[i] != dep[par[i]] + 1:
                raise ValueError(f"node {i}: depth {dep[i]} != parent depth + 1")
        if self.cum_logp is not None and self.cum_logp.shape[0] != n:
            raise ValueError("cum_logp must have one entry per node")
        if self.q is not None and self.q.shape[0] != n:
            raise ValueError("q must have one row per node")
        if self.child_mode not in ("topk", "sample", "sample_wor"):
            raise ValueError(f"unknown child_mode {self.child_mode!r}")
        if self.child_mode != "sample":
            toks = self.tokens.tolist()
            for kids in self.children():
                if len({toks[c] for c in kids}) != len(kids):
                    raise ValueError(f"child_mode {self.child_mode!r} needs distinct sibling tokens")
        return self

    @staticmethod
    def chain(tokens: list[int]) -> "DraftTree":
        """A linear tree: root followed by a chain of drafted tokens."""
        n = len(tokens)
        return DraftTree(
            tokens=torch.tensor(tokens, dtype=torch.long),
            parents=torch.arange(-1, n - 1, dtype=torch.long),
            depths=torch.arange(n, dtype=torch.long),
        )
