"""Hardware-aware sizing: the verify cost model, prefix pruning and size_tree's objective."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.tree import (
    VerifyCostModel,
    build_best_first,
    expected_accepted,
    path_accept_prob,
    size_tree,
    subtree_prefix,
)
from paratree.tree.draft_tree import DraftTree


def test_cost_model_interpolation_and_extrapolation():
    c = VerifyCostModel([(16, 2.0), (1, 1.0), (8, 1.0)])
    assert c(1) == 1.0 and c(8) == 1.0 and c(16) == 2.0
    assert math.isclose(c(12), 1.5)
    assert math.isclose(c(32), 4.0)  # last slope 1/8 per node
    assert c(0) == 1.0  # flat first segment
    steep = VerifyCostModel([(4, 1.0), (8, 3.0)])
    assert steep(1) == 0.0 and math.isclose(steep(3), 0.5)  # clamped at 0
    assert VerifyCostModel([(8, 0.7)])(100) == 0.7  # one point: constant
    assert torch.allclose(c.seconds([1, 12, 32]), torch.tensor([1.0, 1.5, 4.0], dtype=torch.float64))


def test_cost_model_monotone_and_duplicates():
    c = VerifyCostModel([(1, 1.0), (4, 0.8), (8, 2.0), (8, 3.0)])  # noisy dip, repeated n
    assert c.points == [(1, 1.0), (4, 1.0), (8, 2.5)]
    xs = torch.arange(0, 40)
    ys = c.seconds(xs)
    assert torch.all(ys[1:] >= ys[:-1])


def test_cost_model_json_and_errors():
    c = VerifyCostModel([(1, 0.01), (64, 0.02), (128, 0.05)])
    assert VerifyCostModel.from_json(c.to_json()).points == c.points
    for bad in ([], [(0, 1.0)], [(4, -1.0)]):
        with pytest.raises(ValueError):
            VerifyCostModel(bad)


def test_cost_model_measure():
    seen = []
    c = VerifyCostModel.measure(lambda n: seen.append(n), [1, 8], repeats=2, warmup=1)
    assert seen == [1, 1, 1, 8, 8, 8] and [n for n, _ in c.points] == [1, 8]


def _tree(budget: int, seed: int, mode: str = "topk") -> DraftTree:
    rows = 2 * torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    t = build_best_first(0, rows, budget=budget, max_depth=4, width=3)
    t.child_mode = mode
    return t


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**16), st.floats(0.0, 0.2), st.floats(0.0, 3.0), st.booleans())
def test_size_tree_picks_the_best_prefix(budget, seed, slope, draft_s, use_profile):
    tree = _tree(budget, seed)
    cost = VerifyCostModel([(1, 1.0), (8, 1.0 + 7 * slope * 0.2), (32, 1.0 + 31 * slope)])
    probs = path_accept_prob(tree, [[0.6, 0.2, 0.1]] * 4) if use_profile else path_accept_prob(tree)
    out = size_tree(tree, probs, cost, draft_seconds=draft_s).validate()
    # brute force over every prefix, from scratch
    objs = []
    for n in range(1, tree.num_nodes + 1):
        e = 1.0 + sum(float(probs[i]) for i in range(1, n))
        objs.append(e / (draft_s + cost(n)))
    best = max(objs)
    assert math.isclose(objs[out.num_nodes - 1], best, rel_tol=1e-9)
    assert out.num_nodes == 1 + objs.index(best)
    assert torch.equal(out.tokens, tree.tokens[: out.num_nodes]) and torch.equal(out.q, tree.q[: out.num_nodes])


def test_size_tree_prefers_small_trees_when_verify_is_steep():
    tree = _tree(30, 0)
    probs = path_accept_prob(tree)
    flat = size_tree(tree, probs, VerifyCostModel([(1, 1.0), (64, 1.0)]))
    steep = size_tree(tree, probs, VerifyCostModel([(1, 1.0), (64, 10.0)]))
    assert flat.num_nodes == tree.num_nodes and steep.num_nodes < tree.num_nodes


def test_sampled_tree_pruning_drops_q():
    tree = _tree(30, 1, mode="sample")
    probs = path_accept_prob(tree)
    pruned = size_tree(tree, probs, VerifyCostModel([(1, 1.0), (64, 10.0)]))
    assert pruned.num_nodes < tree.num_nodes and pruned.q is None  # verification falls back to target matching
    kept = size_tree(tree, probs, VerifyCostModel([(1, 1.0), (64, 1.0)]))
    assert kept.num_nodes == tree.num_nodes and kept.q is not None


def test_subtree_prefix_is_always_a_tree():
    tree = _tree(25, 2)
    for n in range(1, tree.num_nodes + 3):
        sub = subtree_prefix(tree, n).validate()
        m = min(n, tree.num_nodes)
        assert sub.num_nodes == m and sub.q.shape[0] == m and sub.cum_logp.shape[0] == m
        assert torch.equal(sub.ancestor_mask(), tree.ancestor_mask()[:m, :m])


def test_expected_accepted_and_path_probs():
    p = torch.tensor([1.0, 0.5, 0.25, 0.4], dtype=torch.float64)
    assert expected_accepted(p).tolist() == [1.0, 1.5, 1.75, 2.15]
    tree = _tree(12, 3)
    assert torch.allclose(path_accept_prob(tree), tree.cum_logp.exp())
    table = [[0.7, 0.2], [0.5]]
    got = path_accept_prob(tree, table)
    ranks = tree.sibling_ranks().tolist()
    for i in range(tree.num_nodes):
        want = 1.0
        for a, b in zip(tree.path_to(i), tree.path_to(i)[1:]):
            d = int(tree.depths[a])
            row = table[d] if d < len(table) else []
            want *= row[ranks[b]] if ranks[b] < len(row) else 0.0
        assert math.isclose(float(got[i]), want)
