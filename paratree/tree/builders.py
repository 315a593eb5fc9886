"""Draft tree construction.

All builders keep parents before children (so every prefix of the node list is a
tree), siblings distinct, at most `budget` nodes *including the root*, and every
depth <= max_depth.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import torch

from paratree.tree.draft_tree import DraftTree


def build_chain(
    root: int,
    tokens: Sequence[int] | torch.Tensor,
    logps: Sequence[float] | torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    child_mode: str = "topk",
) -> DraftTree:
    """Root followed by a chain of D drafted tokens.

    q: (D, V) or (D+1, V); row i is the distribution tokens[i] was drawn from (the
    leaf gets a zero row if absent). logps default to log q[i, tokens[i]].
    """
    toks = torch.as_tensor(list(tokens) if not torch.is_tensor(tokens) else tokens, dtype=torch.long).reshape(-1)
    D = toks.numel()
    if q is not None:
        if q.shape[0] == D:
            q = torch.cat([q, q.new_zeros(1, q.shape[1])], 0)
        if q.shape[0] != D + 1:
            raise ValueError(f"q must have D={D} or D+1 rows, got {q.shape[0]}")
    if logps is None and q is not None:
        logps = torch.log(q[torch.arange(D), toks].double()) if D else torch.zeros(0, dtype=torch.float64)
    cum = None
    if logps is not None:
        lp = torch.as_tensor(logps, dtype=torch.float64).reshape(-1)
        cum = torch.cat([lp.new_zeros(1), torch.cumsum(lp, 0)])
    return DraftTree(
        tokens=torch.cat([torch.tensor([root], dtype=torch.long), toks]),
        parents=torch.arange(-1, D, dtype=torch.long),
        depths=torch.arange(D + 1, dtype=torch.long),
        cum_logp=cum,
        q=q,
        child_mode=child_mode,
        meta={"builder": "chain"},
    )


def _top_children(logp: torch.Tensor, cap: int) -> tuple[list[float], list[int]]:
    """Top-`cap` finite (log-prob, token), best first; ties go to the lower token id.

    A stable sort of only the candidates at or above the cap-th value (topk finds it): the
    same result as stable-sorting the whole row, ~10x cheaper on a 49k vocab."""
    k = min(cap, logp.numel())
    if k <= 0:
        return [], []
    thr = torch.topk(logp, k).values[-1]
    cand = torch.nonzero(logp >= thr if bool(torch.isfinite(thr)) else torch.isfinite(logp)).view(-1)
    order = torch.sort(logp[cand], descending=True, stable=True).indices[:k]
    return logp[cand[order]].tolist(), cand[order].tolist()


def build_chain_with_siblings(
    root: int,
    first_logp: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    depth: int,
    width: int,
    token_map: Sequence[int] | None = None,
    min_prob: float = 0.0,
) -> DraftTree:
    """An autoregressive drafter's tree: the greedy chain, plus its width-1 runner-up tokens as leaves.

    first_logp: the drafter's log-probs for the token after the root; step(token) feeds the
    chain token just chosen (a target id) and returns the next log-probs. Costs depth - 1 calls.
    token_map maps drafter indices to target ids (a reduced draft vocab). Children are
    deterministic top-k (no q): target-sample matching verifies them losslessly.
    min_prob stops the chain early once the drafter's own probability of the chain token just
    added falls below it (HF assisted generation's confidence stop): a sequential drafter then
    spends no steps past the point where it expects rejection. It looks only at draft
    probabilities, so it cannot bias acceptance.
    """
    toks, parents, depths, cum = [root], [-1], [0], [0.0]
    node, logp = 0, first_logp
    for d in range(depth):
        vals, idx = _top_children(logp, width)
        if not idx:
            break
        first = len(toks)
        for v, i in zip(vals, idx):
            toks.append(int(token_map[i]) if token_map is not None else i)
            parents.append(node)
            depths.append(d + 1)
            cum.append(cum[node] + v)
        node = first
        if min_prob > 0 and vals[0] < math.log(min_prob):
            break
        if d + 1 < depth:
            logp = step(toks[first])
    return DraftTree(tokens=torch.tensor(toks), parents=torch.tensor(parents), depths=torch.tensor(depths),
                     cum_logp=torch.tensor(cum, dtype=torch.float64), meta={"builder": "chain_with_siblings"})


def build_best_first(
    root: int,
    per_depth_logp: torch.Tensor | None,
    budget: int,
    max_depth: int,
    width: int,
    path_dist: Callable[[list[int]], torch.Tensor] | None = None,
    fanout_caps: Sequence[int] | None = None,
    keep_q: bool = True,
) -> DraftTree:
    """Best-first (accum_logp) tree: a max-heap on cumulative draft log-prob.

    Pop the best node; if its depth d < max_depth, append its top-c children at once,
    c = min(width, fanout_caps[d], budget - n) (missing caps = width), best first,
    and push them. Ties pop in insertion order. Children come from row d of
    per_depth_logp (parallel heads: row d = children at depth d+1, so depth is also
    capped by D) or from path_dist(path tokens after the root) for path-conditioned
    drafting (called only for expanded nodes). Inputs may be logits; they are
    log-softmaxed. Zero-probability tokens are never added.

    Invariant: pops are non-increasing in cum_logp, so every expanded node has
    cum_logp >= every included node that was left unexpanded and >= every top-c
    child left out.

    q[i] = softmax of node i's child distribution: with per-depth rows every node at
    depth < D gets its row (expanded or not); with path_dist only expanded nodes get
    one; other rows are zero (they have no children, so the row is never read).
    """
    if budget < 1 or width < 0 or max_depth < 0:
        raise ValueError("need budget >= 1, width >= 0, max_depth >= 0")
    if (per_depth_logp is None) == (path_dist is None):
        raise ValueError("give exactly one of per_depth_logp and path_dist")
    rows = None
    if per_depth_logp is not None:
        rows = torch.log_softmax(per_depth_logp.double(), dim=-1)
        max_depth = min(max_depth, rows.shape[0])
    caps = list(fanout_caps or [])

    tokens, parents, depths, cum = [root], [-1], [0], [0.0]
    paths: list[list[int]] = [[]]
    dists: dict[int, torch.Tensor] = {}
    heap = [(-0.0, 0)]
    while heap and len(tokens) < budget:
        neg, u = heapq.heappop(heap)
        d = depths[u]
        if d >= max_depth:
            continue
        cap = min(width, caps[d] if d < len(caps) else width, budget - len(tokens))
        if cap <= 0:
            continue
        if rows is not None:
            lp = rows[d]
        else:
            lp = torch.log_softmax(path_dist(paths[u]).double(), dim=-1)
            dists[u] = lp
        for v, t in zip(*_top_children(lp, cap)):
            i = len(tokens)
            tokens.append(t)
            parents.append(u)
            depths.append(d + 1)
            cum.append(cum[u] + v)
            paths.append(paths[u] + [t])
            heapq.heappush(heap, (-(cum[u] + v), i))

    n = len(tokens)
    q = None
    if keep_q:
        if rows is not None:
            V = rows.shape[1]
            q = torch.zeros(n, V, dtype=torch.float32)
            dep = torch.tensor(depths)
            inner = dep < rows.shape[0]
            q[inner] = rows.exp().float()[dep[inner]]
        elif dists:
            V = next(iter(dists.values())).shape[-1]
            q = torch.zeros(n, V, dtype=torch.float32)
            for u, lp in dists.items():
                q[u] = lp.exp().float()
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        cum_logp=torch.tensor(cum, dtype=torch.float64),
        q=q,
        child_mode="topk",
        meta={"builder": "best_first", "budget": budget, "width": width, "fanout_caps": caps},
    )


def top2gap_caps(per_depth_logp: torch.Tensor, width: int, beta: float = 1.0, g0: float = 1.0) -> list[int]:
    """Adaptive width: b_d = max(1, round(K * sigmoid(-beta * (g_d - g0)))), g_d = top-1 minus top-2 log-prob.

    A decisive depth (large gap) gets a narrow fan-out, an uncertain one up to K.
    """
    lp = torch.log_softmax(per_depth_logp.double(), dim=-1)
    caps = []
    for row in lp:
        top = torch.topk(row, min(2, row.numel())).values.tolist()
        gap = top[0] - top[1] if len(top) == 2 else math.inf
        s = 1.0 / (1.0 + math.exp(min(beta * (gap - g0), 700.0)))
        caps.append(min(width, max(1, round(width * s))))
    return caps


def profile_caps(
    table: Sequence[Sequence[float] | None] | torch.Tensor | None,
    width: int,
    tau: float = 0.02,
    num_depths: int | None = None,
) -> list[int]:
    """Per-depth caps from a measured (depth, rank) acceptance table.

    b_d = #{r : table[d][r] >= tau} clamped to [1, K]; missing or empty rows give K.
    """
    rows = [] if table is None else [None if r is None else list(map(float, r)) for r in table]
    n = len(rows) if num_depths is None else num_depths
    caps = []
    for d in range(n):
        row = rows[d] if d < len(rows) else None
        if not row:
            caps.append(width)
        else:
            caps.append(min(width, max(1, sum(v >= tau for v in row))))
    return caps


class AcceptanceProfile:
    """Accumulates how often the target's choice at a depth-d node has drafter rank r.

    Rank is measured in the node's full draft distribution q when available (so caps
    cannot hide wider ranks), else as the position among the node's children; a miss
    (rank >= width, or no matching child) counts as a visit without a hit.
    table()[d][r] = hits / visits at depth d: the profile `profile_caps` reads.
    """

    def __init__(self, max_depth: int, width: int):
        self.width = width
        self.hits = torch.zeros(max_depth, width, dtype=torch.long)
        self.visits = torch.zeros(max_depth, dtype=torch.long)

    def observe(self, depth: int, rank: int | None) -> None:
        if depth >= self.visits.numel():
            return
        self.visits[depth] += 1
        if rank is not None and 0 <= rank < self.width:
            self.hits[depth, rank] += 1

    def observe_tree(self, tree: DraftTree, path: list[int], tokens: list[int]) -> None:
        """Record one verify outcome: tokens[k] is the target's choice at node path[k]."""
        kids = tree.children()
        for node, tok in zip(path, tokens):
            d = int(tree.depths[node])
            qrow = tree.q[node] if tree.q is not None else None
            if qrow is not None and float(qrow.sum()) > 0:
                self.observe(d, int((qrow > qrow[tok]).sum()))
            elif kids[node]:
                ranks = [r for r, c in enumerate(kids[node]) if int(tree.tokens[c]) == tok]
                self.observe(d, ranks[0] if ranks else None)

    def table(self) -> list[list[float]]:
        """Per-depth hit rates; depths never visited are left out (callers fall back to K)."""
        out = []
        for d in range(self.visits.numel()):
            v = int(self.visits[d])
            out.append((self.hits[d].double() / v).tolist() if v else [])
        while out and not out[-1]:
            out.pop()
        return out
