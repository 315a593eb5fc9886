"""Property tests for the tree builders and the acceptance profile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.tree import (
    AcceptanceProfile,
    DraftTree,
    build_best_first,
    build_chain,
    profile_caps,
    top2gap_caps,
)


@st.composite
def builder_inputs(draw):
    V = draw(st.integers(2, 8))
    D = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    rows = scale * torch.randn(D, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    caps = draw(st.none() | st.lists(st.integers(1, 5), min_size=0, max_size=6))
    return dict(
        per_depth_logp=rows,
        budget=draw(st.integers(1, 30)),
        max_depth=draw(st.integers(0, 6)),
        width=draw(st.integers(1, 5)),
        fanout_caps=caps,
    )


def _cap(kw, d):
    caps = kw["fanout_caps"] or []
    return min(kw["width"], caps[d] if d < len(caps) else kw["width"], kw["per_depth_logp"].shape[1])


@settings(max_examples=150, deadline=None)
@given(builder_inputs())
def test_structure_budget_depth_caps(kw):
    tree = build_best_first(7, **kw).validate()  # parents precede children, depth = parent depth + 1
    lp = torch.log_softmax(kw["per_depth_logp"], -1)
    D = lp.shape[0]
    assert 1 <= tree.num_nodes <= kw["budget"]
    assert int(tree.tokens[0]) == 7 and tree.child_mode == "topk"
    assert int(tree.depths.max()) <= min(kw["max_depth"], D)
    for u, kids in enumerate(tree.children()):
        d = int(tree.depths[u])
        toks = [int(tree.tokens[c]) for c in kids]
        assert len(set(toks)) == len(toks)  # distinct siblings
        assert len(kids) <= _cap(kw, d)  # fan-out caps
        # children are the best tokens of the node's row, best first, with cumulative log-probs
        best = torch.sort(lp[d], descending=True, stable=True).indices[: len(kids)].tolist() if kids else []
        assert toks == best
        for c, t in zip(kids, toks):
            assert math.isclose(float(tree.cum_logp[c]), float(tree.cum_logp[u] + lp[d, t]), abs_tol=1e-9)
    # q rows: the depth row for depth < D, zero past it
    for i in range(tree.num_nodes):
        d = int(tree.depths[i])
        want = torch.softmax(kw["per_depth_logp"][d], -1).float() if d < D else torch.zeros(lp.shape[1])
        assert torch.allclose(tree.q[i], want, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(builder_inputs())
def test_best_first_invariant(kw):
    """Pops are non-increasing in cum_logp and children come in whole (budget-truncated) groups, so:
    every expanded node (one with children) has cum_logp >= (a) every included node that could have
    been expanded but was not, and (b) every left-out top-cap child of an included node."""
    tree = build_best_first(0, **kw)
    lp = torch.log_softmax(kw["per_depth_logp"], -1)
    D = min(kw["max_depth"], lp.shape[0])
    kids = tree.children()
    cum = tree.cum_logp.tolist()
    expanded = [u for u in range(tree.num_nodes) if kids[u]]
    if not expanded:
        assert tree.num_nodes == 1
        return
    floor = min(cum[u] for u in expanded)
    full_groups = 0
    for u in range(tree.num_nodes):
        d = int(tree.depths[u])
        if d >= D or _cap(kw, d) == 0:
            continue
        if not kids[u]:
            assert cum[u] <= floor + 1e-12  # (a)
        present = {int(tree.tokens[c]) for c in kids[u]}
        top = torch.sort(lp[d], descending=True, stable=True).indices[: _cap(kw, d)].tolist()
        for t in top:
            if t not in present:
                assert cum[u] + float(lp[d, t]) <= floor + 1e-12  # (b)
        full_groups += bool(kids[u]) and len(kids[u]) < _cap(kw, d)
    assert full_groups <= 1  # only the last expansion can be cut by the budget
    # budget is used up unless the tree is complete
    if tree.num_nodes < kw["budget"]:
        for u in range(tree.num_nodes):
            d = int(tree.depths[u])
            assert d >= D or len(kids[u]) == _cap(kw, d)


@settings(max_examples=60, deadline=None)
@given(builder_inputs())
def test_path_dist_ignoring_path_equals_per_depth(kw):
    rows = kw.pop("per_depth_logp")
    calls = []

    def path_dist(path):
        calls.append(list(path))
        return rows[len(path)]

    a = build_best_first(3, rows, **kw)
    b = build_best_first(3, None, path_dist=path_dist, **{**kw, "max_depth": min(kw["max_depth"], rows.shape[0])})
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
    assert torch.equal(a.depths, b.depths) and torch.allclose(a.cum_logp, b.cum_logp)
    # the callback sees each expanded node's drafted path (root excluded), once
    kids = b.children()
    expanded = [u for u in range(b.num_nodes) if kids[u]]
    paths = [[int(b.tokens[i]) for i in b.path_to(u)[1:]] for u in expanded]
    assert all(p in calls for p in paths) and len(calls) == len({tuple(c) for c in calls})
    if b.q is not None:
        for u in expanded:
            assert torch.allclose(b.q[u], a.q[u], atol=1e-6)


def test_path_conditioned_children_follow_the_path():
    V = 5

    def path_dist(path):  # next token prefers (last + 1) mod V
        last = path[-1] if path else 0
        return torch.tensor([3.0 if t == (last + 1) % V else 0.0 for t in range(V)])

    tree = build_best_first(0, None, budget=12, max_depth=4, width=2, path_dist=path_dist).validate()
    for u, kids in enumerate(tree.children()):
        if kids:
            last = int(tree.tokens[u]) if u else 0
            assert int(tree.tokens[kids[0]]) == (last + 1) % V


def test_ancestor_mask_matches_path_to():
    g = torch.Generator().manual_seed(1)
    for budget in (1, 5, 17, 40):
        tree = build_best_first(0, torch.randn(4, 6, generator=g), budget=budget, max_depth=4, width=3)
        mask = tree.ancestor_mask()
        for i in range(tree.num_nodes):
            assert set(torch.nonzero(mask[i])[:, 0].tolist()) == set(tree.path_to(i))


def test_small_and_degenerate_inputs():
    rows = torch.randn(3, 4)
    assert build_best_first(0, rows, budget=1, max_depth=3, width=2).num_nodes == 1
    assert build_best_first(0, rows, budget=10, max_depth=0, width=2).num_nodes == 1
    # width beyond the vocab, and zero-probability tokens are never drafted
    rows[:, 0] = float("-inf")
    t = build_best_first(0, rows, budget=50, max_depth=2, width=10).validate()
    assert t.num_nodes == 1 + 3 + 9 and 0 not in t.tokens[1:].tolist()
    assert build_best_first(0, rows, budget=5, max_depth=2, width=2, keep_q=False).q is None
    with pytest.raises(ValueError):
        build_best_first(0, rows, budget=5, max_depth=2, width=2, path_dist=lambda p: rows[0])
    with pytest.raises(ValueError):
        build_best_first(0, rows, budget=0, max_depth=2, width=2)


def test_build_chain():
    q = torch.softmax(torch.randn(3, 6), -1)
    t = build_chain(9, [4, 1, 2], q=q, child_mode="sample").validate()
    assert t.tokens.tolist() == [9, 4, 1, 2] and t.parents.tolist() == [-1, 0, 1, 2]
    assert t.q.shape == (4, 6) and float(t.q[3].abs().sum()) == 0
    want = torch.cumsum(torch.log(q[torch.arange(3), torch.tensor([4, 1, 2])]).double(), 0)
    assert torch.allclose(t.cum_logp[1:], want) and float(t.cum_logp[0]) == 0
    t2 = build_chain(9, torch.tensor([4, 1]), logps=[-0.5, -0.25])
    assert t2.cum_logp.tolist() == [0.0, -0.5, -0.75] and t2.q is None and t2.child_mode == "topk"
    assert build_chain(3, []).num_nodes == 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.floats(0.1, 4.0), st.floats(-2.0, 3.0), st.integers(0, 2**16))
def test_top2gap_caps_formula(D, K, beta, g0, seed):
    rows = 3 * torch.randn(D, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    caps = top2gap_caps(rows, K, beta=beta, g0=g0)
    lp = torch.log_softmax(rows, -1)
    for d in range(D):
        a, b = sorted(lp[d].tolist(), reverse=True)[:2]
        want = max(1, round(K / (1 + math.exp(beta * ((a - b) - g0)))))
        assert caps[d] == min(K, want) and 1 <= caps[d] <= K


def test_top2gap_extremes():
    decisive = torch.tensor([[20.0, 0, 0, 0]])
    flat = torch.zeros(1, 4)
    assert top2gap_caps(decisive, 6) == [1]
    assert top2gap_caps(flat, 6, beta=1.0, g0=1.0) == [round(6 / (1 + math.exp(-1)))]
    assert top2gap_caps(flat, 6, g0=1e6) == [6]  # a huge g0 recovers accum_logp


@settings(max_examples=100, deadline=None)
@given(st.lists(st.none() | st.lists(st.floats(0.0, 1.0), max_size=8), max_size=5), st.integers(1, 6),
       st.floats(0.001, 0.5), st.integers(0, 7))
def test_profile_caps_formula(table, K, tau, depths):
    caps = profile_caps(table, K, tau=tau, num_depths=depths)
    assert len(caps) == depths
    for d in range(depths):
        row = table[d] if d < len(table) else None
        want = K if not row else min(K, max(1, sum(v >= tau for v in row)))
        assert caps[d] == want


def test_acceptance_profile():
    prof = AcceptanceProfile(max_depth=3, width=3)
    q = torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 3 + [[0.0] * 4])
    tree = build_chain(0, [0, 1, 2], q=q, child_mode="sample")
    prof.observe_tree(tree, [0, 1], [0, 2])  # depth 0: rank 0; depth 1: token 2 is rank 2 in q
    prof.observe_tree(tree, [0], [3])  # depth 0: rank 3 >= width -> miss
    assert prof.table() == [[0.5, 0.0, 0.0], [0.0, 0.0, 1.0]]
    # without q: rank among the children
    t2 = DraftTree(torch.tensor([0, 4, 6]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 1]))
    p2 = AcceptanceProfile(max_depth=2, width=2)
    p2.observe_tree(t2, [0, 2], [6, 1])  # hit rank 1 at depth 0; node 2 is a leaf: not counted
    p2.observe_tree(t2, [0], [5])  # miss
    assert p2.table() == [[0.0, 0.5]]
    assert profile_caps(prof.table(), 3, tau=0.3, num_depths=3) == [1, 1, 3]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-math.inf, -3.0, -1.5, -1.0, 0.0, 0.5]), min_size=1, max_size=40),
       st.integers(0, 12))
def test_top_children_equals_a_stable_sort_of_the_whole_row(values, cap):
    """The topk shortcut picks exactly what a stable descending sort would: ties to the lower id, no -inf."""
    from paratree.tree.builders import _top_children

    logp = torch.tensor(values, dtype=torch.float64)
    vals, idx = torch.sort(logp, descending=True, stable=True)
    keep = torch.isfinite(vals[:cap])
    assert _top_children(logp, cap) == (vals[:cap][keep].tolist(), idx[:cap][keep].tolist())
