"""Acceptance rules: exact per-node losslessness, greedy walk, dispatch, batching, seeds."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.tree import DraftTree, build_best_first, build_chain
from paratree.verify import (
    SamplingParams,
    accept,
    accept_batch,
    accept_chain_rejection,
    accept_greedy,
    accept_specinfer,
    accept_target_sample,
    child_accept_probs,
    choose_method,
    resolve_rule,
    stack_trees,
    warp_probs,
)

V = 5


# ------------------------------------------------------------ exact single-node losslessness
def _dist_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.softmax(1.5 * torch.randn(V, generator=g, dtype=torch.float64), 0)  # noqa: E731
    p1, q1 = r(), r()
    q_zero = r().clone()
    q_zero[[0, 1]] = 0
    q_zero /= q_zero.sum()
    p_zero = warp_probs(torch.log(r()), SamplingParams(temperature=1.0, top_k=2))  # warped p with zeros
    disjoint_p = torch.tensor([0.5, 0.5, 0, 0, 0], dtype=torch.float64)
    disjoint_q = torch.tensor([0, 0, 0.2, 0.3, 0.5], dtype=torch.float64)
    peaked_q = torch.tensor([0.9, 0.025, 0.025, 0.025, 0.025], dtype=torch.float64)
    return {
        "random": (p1, q1),
        "q(x)=0<p(x)": (p1, q_zero),
        "p=q": (p1, p1.clone()),
        "p has zeros": (p_zero, q1),
        "disjoint (all rejected)": (disjoint_p, disjoint_q),
        "peaked q (duplicates)": (p1, peaked_q),
    }


CASES = _dist_cases()


def _draws(q: torch.Tensor, k: int, replacement: bool):
    """All ordered k-tuples of children with their drafting probability."""
    support = [x for x in range(V) if q[x] > 0]
    if replacement:
        for t in itertools.product(support, repeat=k):
            yield t, float(torch.prod(q[list(t)]))
    else:
        for t in itertools.permutations(support, k):
            w, left = 1.0, 1.0
            for x in t:
                w *= float(q[x]) / left
                left -= float(q[x])
            yield t, w


def _emitted_marginal(p, q, rule, k, replacement):
    tuples, weights = zip(*_draws(q, k, replacement))
    kids = torch.tensor(tuples, dtype=torch.long)
    B = kids.shape[0]
    acc, resid = child_accept_probs(p.expand(B, V), q.expand(B, V), kids, rule)
    assert torch.all(acc >= 0) and torch.all(acc.sum(1) <= 1 + 1e-12)
    assert torch.allclose(resid.sum(1), torch.ones(B, dtype=torch.float64))
    per = torch.zeros(B, V, dtype=torch.float64).scatter_add_(1, kids, acc) + (1 - acc.sum(1, keepdim=True)) * resid
    w = torch.tensor(weights, dtype=torch.float64)
    assert abs(float(w.sum()) - 1) < 1e-12
    return (w[:, None] * per).sum(0), per


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rule,replacement", [("specinfer", True), ("recursive", False)])
def test_rejection_rules_are_exactly_lossless(case, k, rule, replacement):
    p, q = CASES[case]
    if not replacement and int((q > 0).sum()) < k:
        pytest.skip("not enough support to draw k children without replacement")
    marginal, _ = _emitted_marginal(p, q, rule, k, replacement)
    assert torch.allclose(marginal, p, atol=1e-12), (marginal, p)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["pointmass", "target_sample"])
def test_matching_rules_are_lossless_for_every_fixed_tree(case, rule):
    # target-sample matching / point mass do not need children ~ q: every tuple must give p
    p, _ = CASES[case]
    uniform = torch.full((V,), 1.0 / V, dtype=torch.float64)
    _, per = _emitted_marginal(p, uniform, rule, 3, replacement=True)  # includes duplicate siblings
    assert torch.allclose(per, p.expand_as(per), atol=1e-12)


def test_analytic_check_can_fail():
    # the wrong rule for the drafting scheme is lossy, and the exact check sees it
    p, q = CASES["random"]
    m_wor, _ = _emitted_marginal(p, q, "specinfer", 2, replacement=False)
    m_iid, _ = _emitted_marginal(p, q, "recursive", 2, replacement=True)
    assert (m_wor - p).abs().max() > 1e-3 and (m_iid - p).abs().max() > 1e-3


def test_pointmass_probabilities_and_duplicates():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    acc, resid = child_accept_probs(p, None, torch.tensor([[3, 3, 1, -1]]), "pointmass")
    assert torch.allclose(acc, torch.tensor([[0.4, 0.0, 0.2, 0.0]], dtype=torch.float64))
    assert torch.allclose(resid, torch.tensor([[0.25, 0, 0.75, 0, 0]], dtype=torch.float64))


def test_degenerate_residuals_stay_finite():
    p = torch.tensor([[0.5, 0.5, 0, 0, 0]], dtype=torch.float32)
    acc, resid = child_accept_probs(p, p.clone(), torch.tensor([[0, 1]]), "specinfer")
    assert float(acc[0, 0]) == 1.0 and float(acc[0, 1]) == 0.0
    assert torch.isfinite(resid).all() and abs(float(resid.sum()) - 1) < 1e-6
    q = torch.tensor([[0.0, 0.0, 1.0, 0, 0]])
    acc, resid = child_accept_probs(p, q, torch.tensor([[0, 2]]), "recursive")  # child with q(x)=0
    assert torch.isfinite(acc).all() and torch.isfinite(resid).all()
    logits = torch.tensor([[[0.0, float("-inf"), 80.0, -80.0, 3.0]] * 3])
    tree = build_chain(7, [2, 2], q=torch.softmax(torch.tensor([[0.0, 0, 9, 0, 0]] * 2), -1), child_mode="sample")
    res = accept(tree, logits[0], SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert res.tokens == [2, 2, 2]


# ------------------------------------------------------------ greedy
def _reference_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    node, path, toks = 0, [0], []
    kids = tree.children()
    while True:
        y = int(torch.argmax(logits[node]))
        nxt = [c for c in kids[node] if int(tree.tokens[c]) == y]
        toks.append(y)
        if not nxt:
            return path, toks
        node = nxt[0]
        path.append(node)


@st.composite
def random_trees(draw, vocab=4):
    n = draw(st.integers(1, 14))
    parents, depths, tokens = [-1], [0], [draw(st.integers(0, vocab - 1))]
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        parents.append(p)
        depths.append(depths[p] + 1)
        tokens.append(draw(st.integers(0, vocab - 1)))  # duplicate siblings allowed
    seed = draw(st.integers(0, 2**16))
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), child_mode="sample")
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed))
    return tree, logits


@settings(max_examples=60, deadline=None)
@given(random_trees())
def test_greedy_matches_reference_walk(tt):
    tree, logits = tt
    res = accept_greedy(tree, logits)
    assert (res.path, res.tokens) == _reference_greedy(tree, logits)
    # greedy params through the other rules give the same tokens (warp is one-hot)
    g = torch.Generator().manual_seed(0)
    assert accept_target_sample(tree, logits, SamplingParams(), g).tokens == res.tokens
    assert accept(tree, logits, SamplingParams(), g, method="pointmass").tokens == res.tokens


@settings(max_examples=40, deadline=None)
@given(random_trees(), st.integers(0, 2**16))
def test_result_is_a_consistent_walk(tt, seed):
    tree, logits = tt
    res = accept_target_sample(tree, logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(seed))
    assert res.path[0] == 0 and len(res.tokens) == len(res.path) == res.num_accepted + 1
    for a, b in zip(res.path, res.path[1:]):
        assert int(tree.parents[b]) == a
    assert res.tokens[:-1] == [int(tree.tokens[i]) for i in res.path[1:]]
    last_kids = {int(tree.tokens[c]) for c in tree.children()[res.path[-1]]}
    assert res.tokens[-1] not in last_kids  # a bonus token matching a child would have been accepted


# ------------------------------------------------------------ dispatch
def _sampled_tree(mode: str, chain: bool = False, with_q: bool = True) -> DraftTree:
    parents = [-1, 0, 1] if chain else [-1, 0, 0]
    depths = [0, 1, 2] if chain else [0, 1, 1]
    q = torch.full((3, V), 1.0 / V) if with_q else None
    return DraftTree(torch.tensor([0, 1, 2]), torch.tensor(parents), torch.tensor(depths), q=q, child_mode=mode)


def test_choose_method():
    T1 = SamplingParams(temperature=1.0)
    assert choose_method(_sampled_tree("sample"), SamplingParams()) == "greedy"
    assert choose_method(_sampled_tree("topk"), T1) == "pointmass"
    assert choose_method(_sampled_tree("sample", chain=True), T1) == "chain"
    assert choose_method(_sampled_tree("sample"), T1) == "specinfer"
    assert choose_method(_sampled_tree("sample_wor"), T1) == "recursive"
    assert choose_method(_sampled_tree("sample", with_q=False), T1) == "target_sample"
    assert resolve_rule(_sampled_tree("sample", chain=True), T1) == "specinfer"
    assert resolve_rule(_sampled_tree("topk", chain=True), T1, "chain") == "pointmass"
    assert resolve_rule(_sampled_tree("sample_wor"), T1, "specinfer") == "specinfer"


def test_dispatch_errors():
    T1, g = SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)
    logits = torch.zeros(3, V)
    with pytest.raises(ValueError, match="chain"):
        accept_chain_rejection(_sampled_tree("sample"), logits, T1, g)
    with pytest.raises(ValueError, match="q"):
        accept_specinfer(_sampled_tree("sample", with_q=False), logits, T1, g)
    with pytest.raises(ValueError, match="unknown method"):
        accept(_sampled_tree("sample"), logits, T1, g, method="typical")
    with pytest.raises(ValueError, match="num_nodes"):
        accept(_sampled_tree("sample"), torch.zeros(2, V), T1, g)
    with pytest.raises(ValueError, match="rule"):
        accept_batch(torch.zeros(1, 1, dtype=torch.long), -torch.ones(1, 1, dtype=torch.long),
                     torch.zeros(1, 1, V), T1, g, "medusa")


# ------------------------------------------------------------ batching and seeds
def test_padded_batch_matches_single_trees():
    g = torch.Generator().manual_seed(3)
    trees = [build_best_first(1, torch.randn(3, V, generator=g), budget=b, max_depth=3, width=2) for b in (1, 4, 9)]
    logits = [torch.randn(t.num_nodes, V, generator=g) for t in trees]
    tokens, parents, _ = stack_trees(trees)
    padded = torch.zeros(len(trees), tokens.shape[1], V)
    for i, lg in enumerate(logits):
        padded[i, : lg.shape[0]] = lg
    res = accept_batch(tokens, parents, padded, SamplingParams(), None, "greedy")
    for i, (t, lg) in enumerate(zip(trees, logits)):
        single = accept_greedy(t, lg)
        n = int(res.lengths[i])
        assert res.tokens[i, :n].tolist() == single.tokens and res.paths[i, :n].tolist() == single.path
        assert torch.all(res.tokens[i, n:] == -1)


@pytest.mark.parametrize("method", ["target_sample", "pointmass", "specinfer", "recursive", "chain"])
def test_same_seed_same_output(method):
    g = torch.Generator().manual_seed(4)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    tree = _sampled_tree("sample", chain=(method == "chain"))
    logits = 0.3 * torch.randn(tree.num_nodes, V, generator=g)
    runs = [[accept(tree, logits, params, gen, method).tokens for _ in range(30)]
            for gen in (params.make_generator(), params.make_generator())]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # and it is actually random
