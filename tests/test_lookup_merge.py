"""Head tree + prompt lookup (`jetspec+ngram`): a valid best-first tree within budget that keeps the
head's best nodes and the lookup's continuation, learns lookup hit rates from the past only, and
keeps greedy decoding identical to plain decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.drafters import NoDrafter, head_family, make_drafter
from paratree.drafters.block_drafter import BlockHeadDrafter
from paratree.drafters.lookup_merge import LookupMergedDrafter
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.tree import build_best_first
from random_heads import random_block_head


class FixedHeadDrafter:
    """A stand-in head: a best-first tree over fixed per-depth logits (tokens 0..V-1)."""

    name = "fake"
    tap_layers = ()

    def __init__(self, logits: torch.Tensor, width: int):
        self.logits, self.width = logits, width

    def begin(self, prompt_ids, prompt_taps):
        pass

    def update(self, new_tokens, new_taps):
        pass

    def propose(self, tokens, budget):
        return build_best_first(tokens[-1], self.logits, budget=budget, max_depth=self.logits.shape[0],
                                width=self.width, keep_q=False)


def _paths(tree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[tree.path_to(i)[1:]].tolist()) for i in range(tree.num_nodes)}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=40), st.integers(1, 40), st.integers(1, 3),
       st.integers(0, 2**16))
def test_merged_tree_is_a_valid_best_first_tree_within_budget(context, budget, width, seed):
    logits = 3 * torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    base = FixedHeadDrafter(logits, width)
    merged = LookupMergedDrafter(base)
    tree = merged.propose(context, budget).validate()
    assert tree.num_nodes <= budget and tree.tokens[0] == context[-1]
    par, cum = tree.parents.tolist(), tree.cum_logp.tolist()
    assert all(cum[i] <= cum[par[i]] for i in range(1, tree.num_nodes))
    for kids in tree.children():
        assert len({int(tree.tokens[c]) for c in kids}) == len(kids)  # siblings are distinct
    head_tree = base.propose(context, budget)
    conts = merged.lookup.continuations(context)
    grafts = {tuple(c[:k]) for c in conts for k in range(1, len(c) + 1)} - _paths(head_tree)
    if budget >= head_tree.num_nodes + len(grafts):  # room for everything: nothing is lost
        assert _paths(tree) == _paths(head_tree) | grafts
    if not grafts:  # nothing to add: the head's own tree, untouched
        assert torch.equal(tree.tokens, head_tree.tokens) and torch.equal(tree.parents, head_tree.parents)
    elif tree.meta.get("grafted"):  # best-first: every prefix is the best set of its size
        assert all(a >= b for a, b in zip(cum, cum[1:]))


def test_lookup_hit_rate_is_learned_from_committed_tokens_only():
    """A rate moves only with rounds already committed, so the tree drafted at step t is the same
    whatever the text after t turns out to be; lookup that keeps being right is trusted more."""
    logits = torch.full((4, 8), -5.0, dtype=torch.float64)
    logits[:, 7] = 5.0  # the fake head always guesses token 7, lookup guesses the repeated pattern
    pattern = [1, 2, 3, 4]
    ctx = pattern * 3
    a, b = LookupMergedDrafter(FixedHeadDrafter(logits, 1)), LookupMergedDrafter(FixedHeadDrafter(logits, 1))
    for d in (a, b):
        d.begin(ctx, None)
    first_a, first_b = a.propose(ctx, 10), b.propose(ctx, 10)
    assert torch.equal(first_a.tokens, first_b.tokens) and torch.equal(first_a.cum_logp, first_b.cum_logp)
    assert (1, 2, 3, 4) in _paths(first_a) and (7, 7, 7, 7) in _paths(first_a)  # lookup beside the head
    r0 = a.rate(1)
    a.propose(ctx + [1, 2, 3], 10)  # the target followed the pattern: lookup was right
    b.propose(ctx + [6, 6, 6], 10)  # the target went elsewhere: lookup was wrong
    assert a.rate(1) > r0 > b.rate(1)
    assert a.rate(3) > b.rate(3)


def test_jetspec_plus_ngram_greedy_equals_plain(tiny_ckpts):
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    head = random_block_head(lm, seed=0)
    drafter = LookupMergedDrafter(BlockHeadDrafter(head, lm.model.embed, lm.model.lm_head, name="jetspec",
                                                   width=3))
    assert drafter.name == "jetspec+ngram" and drafter.tap_layers == head.cfg.tap_layers
    runner = TargetRunner(lm.model, max_len=160)
    grafted = []
    propose = drafter.propose
    drafter.propose = lambda tokens, budget: grafted.append(propose(tokens, budget)) or grafted[-1]
    for prompt in ([5, 6, 7, 8] * 4, [9, 3, 9, 3, 11, 9, 3], list(range(20, 36))):
        ref = Generator(runner, NoDrafter()).generate(prompt, 40).token_ids
        gen = Generator(runner, drafter, budget=12)
        res = gen.generate(prompt, 40)
        assert res.token_ids == ref
    assert sum(t.meta["grafted"] for t in grafted) > 0  # lookup did add branches


def test_copies_keep_their_own_sequence_state(tiny_ckpts):
    """The server gives each sequence copy.copy(prototype): interleaved sequences must not mix."""
    import copy

    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    head = random_block_head(lm, seed=1)
    proto = LookupMergedDrafter(BlockHeadDrafter(head, lm.model.embed, lm.model.lm_head, name="jetspec", width=3))
    runner = TargetRunner(lm.model, max_len=64)
    ctx1, ctx2 = [5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 9, 3, 9, 3]
    taps1 = runner.prefill(ctx1[:-1], taps=head.cfg.tap_layers)
    runner.reset()
    taps2 = runner.prefill(ctx2[:-1], taps=head.cfg.tap_layers)
    alone = copy.copy(proto)
    alone.begin(ctx1, taps1)
    want = [alone.propose(ctx1, 10), alone.propose(ctx1 + [7, 5], 10)]
    a, b = copy.copy(proto), copy.copy(proto)
    a.begin(ctx1, taps1)
    b.begin(ctx2, taps2)
    got = [a.propose(ctx1, 10)]
    b.propose(ctx2, 10)
    b.propose(ctx2 + [9, 9], 10)
    got.append(a.propose(ctx1 + [7, 5], 10))
    for w, g in zip(want, got):
        assert torch.equal(w.tokens, g.tokens) and torch.equal(w.parents, g.parents)
    assert a.base is not b.base and a.base.head is b.base.head  # own state, shared weights


def test_make_drafter_builds_merged_drafters_and_refuses_unknown_ones(tiny_ckpts):
    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    with pytest.raises(ValueError, match="no trained jetspec head"):
        make_drafter("jetspec+ngram", lm)
    with pytest.raises(ValueError, match="unknown drafter 'ngram\\+ngram'"):
        make_drafter("ngram+ngram", lm)
    assert [head_family(n) for n in ("jetspec+ngram", "ddtree+ngram", "jetspec-pc", "ngram", "draft-model")] == \
        ["jetspec", "dflash", "jetspec", None, None]
