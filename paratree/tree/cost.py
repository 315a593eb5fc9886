"""Hardware-aware tree sizing.

A verify forward over n tree nodes costs T(n), measured on the actual device
(flat while the accelerator is under-used, then rising). Because parents precede
children, every prefix of a tree's node list is a tree, so sizing is a 1-D search
for the prefix that maximises expected accepted tokens per second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from paratree.tree.draft_tree import DraftTree


@dataclass
class VerifyCostModel:
    """Verify latency T(n) from measured (n_nodes, seconds) points.

    Piecewise-linear between points; made monotone (running max); extrapolated
    linearly with the end segments' slopes and clamped at >= 0. One point = constant.
    Repeated n are averaged.
    """

    points: list[tuple[int, float]]

    def __post_init__(self):
        if not self.points:
            raise ValueError("VerifyCostModel needs at least one (n_nodes, seconds) point")
        by_n: dict[int, list[float]] = {}
        for n, s in self.points:
            if n < 1 or s < 0:
                raise ValueError(f"bad cost point ({n}, {s}): need n >= 1 and seconds >= 0")
            by_n.setdefault(int(n), []).append(float(s))
        ns = sorted(by_n)
        secs, running = [], 0.0
        for n in ns:
            running = max(running, sum(by_n[n]) / len(by_n[n]))
            secs.append(running)
        self.points = list(zip(ns, secs))

    def seconds(self, n: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """T(n), vectorised over n."""
        n = torch.as_tensor(n, dtype=torch.float64)
        xs = torch.tensor([p[0] for p in self.points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in self.points], dtype=torch.float64)
        if xs.numel() == 1:
            return ys[0].expand(n.shape).clone()
        seg = (torch.searchsorted(xs, n.contiguous(), right=True) - 1).clamp(0, xs.numel() - 2)
        x0, x1, y0, y1 = xs[seg], xs[seg + 1], ys[seg], ys[seg + 1]
        return (y0 + (y1 - y0) / (x1 - x0) * (n - x0)).clamp_min(0.0)

    def __call__(self, n: int) -> float:
        return float(self.seconds(n))

    def to_json(self) -> str:
        return json.dumps({"points": [[n, s] for n, s in self.points]})

    @classmethod
    def from_json(cls, text: str) -> "VerifyCostModel":
        return cls([(int(n), float(s)) for n, s in json.loads(text)["points"]])

    @classmethod
    def measure(
        cls, run: Callable[[int], None], sizes: Sequence[int], repeats: int = 3, warmup: int = 1,
        sync: Callable[[], None] | None = None,
    ) -> "VerifyCostModel":
        """Time `run(n)` (one verify forward over n nodes) and keep the best of `repeats`."""
        pts = []
        for n in sizes:
            for _ in range(warmup):
                run(n)
            best = float("inf")
            for _ in range(repeats):
                if sync:
                    sync()
                t0 = time.perf_counter()
                run(n)
                if sync:
                    sync()
                best = min(best, time.perf_counter() - t0)
            pts.append((n, best))
        return cls(pts)


def subtree_prefix(tree: DraftTree, n: int) -> DraftTree:
    """The tree made of the first n nodes (all per-node fields sliced consistently)."""
    n = max(1, min(n, tree.num_nodes))
    return DraftTree(
        tokens=tree.tokens[:n],
        parents=tree.parents[:n],
        depths=tree.depths[:n],
        cum_logp=None if tree.cum_logp is None else tree.cum_logp[:n],
        q=None if tree.q is None else tree.q[:n],
        child_mode=tree.child_mode,
        meta=dict(tree.meta),
    )


def expected_accepted(node_accept_prob: torch.Tensor) -> torch.Tensor:
    """E[tokens per round] for every prefix: out[n-1] = 1 + sum_{i=1}^{n-1} P(path to i accepted)."""
    p = node_accept_prob.double().reshape(-1)
    return torch.cat([p.new_ones(1), 1.0 + torch.cumsum(p[1:], 0)])


def path_accept_prob(tree: DraftTree, table: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
    """Per-node estimate of P(path to i accepted).

    Without a table: exp(cum_logp) (the drafter's own probability). With a
    (depth, rank) acceptance table: the product of table[depth(parent)][rank] along the path.
    """
    if table is None:
        if tree.cum_logp is None:
            raise ValueError("path_accept_prob needs tree.cum_logp or a profile table")
        return tree.cum_logp.double().exp()
    ranks = tree.sibling_ranks().tolist()
    par, dep = tree.parents.tolist(), tree.depths.tolist()
    cond = [1.0] * tree.num_nodes
    for i in range(1, tree.num_nodes):
        row = table[dep[par[i]]] if dep[par[i]] < len(table) else []
        cond[i] = row[ranks[i]] if ranks[i] < len(row) else 0.0
    return path_product(tree, cond)


def path_product(tree: DraftTree, cond: Sequence[float]) -> torch.Tensor:
    """P(path to i accepted) from cond[i] = P(node i accepted | its parent accepted); the root is 1."""
    par = tree.parents.tolist()
    out = [1.0] * tree.num_nodes
    for i in range(1, tree.num_nodes):  # parents precede children
        out[i] = out[par[i]] * float(cond[i])
    return torch.tensor(out, dtype=torch.float64)


def size_tree(
    tree: DraftTree, node_accept_prob: torch.Tensor, cost: VerifyCostModel, draft_seconds: float = 0.0
) -> DraftTree:
    """Prune to the prefix maximising E[accepted](n) / (draft_seconds + T(n)); first max on ties.

    A sampled tree (child_mode sample/sample_wor) pruned by token-dependent scores no
    longer has children distributed as q, so its q is dropped: verification then
    falls back to target-sample matching, which is lossless for any tree.
    """
    N = tree.num_nodes
    e = expected_accepted(node_accept_prob)[:N]
    t = cost.seconds(torch.arange(1, N + 1)) + draft_seconds
    obj = e / t.clamp_min(1e-12)
    n = int(torch.argmax(obj)) + 1  # argmax returns the first maximum
    out = subtree_prefix(tree, n)
    out.meta["sized_from"] = N
    if n < N and tree.child_mode != "topk":
        out = replace(out, q=None)
    return out
