"""The draft-model drafter: a small LM with its own KV cache, lossless through the verification core."""

import pytest
import torch

from hf_oracle import make_tiny_checkpoint
from paratree.drafters import NoDrafter, make_drafter
from paratree.drafters.draft_model import DraftModelDrafter, TokenizerMismatchError, check_same_tokenizer
from paratree.drafters.families import draft_model as dm_family
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.verify.warp import SamplingParams, warp_probs
from test_verify_lossless import g_test


@pytest.fixture(scope="module")
def pair(tiny_ckpts, tmp_path_factory):
    """fp64 target, the target itself as a perfect draft, and an unrelated random draft of the same vocab."""
    target = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    other = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("draft") / "llama", seed=7)
    return target, load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False), load_model(str(other), "fp64",
                                                                                             tokenizer=False)


def _plain(runner, prompt, n):
    return Generator(runner, NoDrafter()).generate(prompt, n).token_ids


@pytest.mark.parametrize("width", [1, 3])
def test_greedy_equals_plain_and_perfect_draft_is_fully_accepted(pair, width):
    target, same, other = pair
    runner = TargetRunner(target.model, max_len=256)
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        prompt = torch.randint(0, 97, (12,), generator=g).tolist()
        truth = _plain(runner, prompt, 40)
        perfect = DraftModelDrafter(same, depth=4, width=width)
        res = Generator(runner, perfect, budget=32).generate(prompt, 40)
        assert res.token_ids == truth
        assert res.tau >= 4.5  # depth 4 + the bonus token nearly every round: the draft cache stays in sync
        # The same drafter object serves a second, different sequence: its cache is rolled back correctly.
        res2 = Generator(runner, perfect, budget=32).generate(prompt[:5], 20)
        assert res2.token_ids == _plain(runner, prompt[:5], 20) and res2.tau >= 4.0
        res3 = Generator(runner, DraftModelDrafter(other, depth=4, width=width), budget=32).generate(prompt, 40)
        assert res3.token_ids == truth
        # Confidence-stopped chains (the default draft-model mode) stay lossless too.
        res4 = Generator(runner, DraftModelDrafter(other, depth=8, width=width, min_prob=0.4), budget=32).generate(
            prompt, 40)
        assert res4.token_ids == truth


def test_confidence_stop_ends_the_chain_at_the_first_unsure_token():
    from paratree.tree.builders import build_chain_with_siblings

    # Draft probabilities of the chain tokens: 0.9, 0.6, 0.3 (first below 0.4, kept), then 0.95 (never asked).
    probs = iter([0.6, 0.3, 0.95, 0.95])
    calls = []

    def row(p, tok):
        lp = torch.full((50,), -1e9)
        lp[tok], lp[tok + 1] = torch.log(torch.tensor(p)), torch.log(torch.tensor((1 - p) * p))  # sibling: runner-up
        return lp

    def step(token):
        calls.append(token)
        return row(next(probs), token + 2)

    tree = build_chain_with_siblings(0, row(0.9, 1), step, depth=8, width=2, min_prob=0.4)
    assert tree.tokens.tolist() == [0, 1, 2, 3, 4, 5, 6] and int(tree.depths.max()) == 3
    assert calls == [1, 3]  # no draft step is spent after the unsure token
    full = build_chain_with_siblings(0, row(0.9, 1), lambda t: row(0.3, t + 2), depth=5, width=1)
    assert int(full.depths.max()) == 5  # min_prob 0 drafts the whole depth


@pytest.mark.parametrize("width", [1, 2])
def test_staged_lookup_drafting_builds_the_sequential_tree_with_fewer_steps(pair, width):
    """The draft model checking a prompt-lookup guess in one forward changes the cost, not the tree."""
    target, same, other = pair
    runner = TargetRunner(target.model, max_len=256)
    g = torch.Generator().manual_seed(11)
    for draft in (same, other):
        for trial in range(2):
            motif = torch.randint(0, 97, (7,), generator=g).tolist()
            prompt = motif + torch.randint(0, 97, (3,), generator=g).tolist() + motif[:4]  # repeats: lookup matches
            seq = DraftModelDrafter(draft, depth=6, width=width, min_prob=0.2 * trial)
            staged = DraftModelDrafter(draft, depth=6, width=width, min_prob=0.2 * trial, lookup=8)
            steps = {"seq": 0, "staged": 0}
            for key, d in (("seq", seq), ("staged", staged)):
                inner = d._step

                def counted(tok, _inner=inner, _key=key):
                    steps[_key] += 1
                    return _inner(tok)

                d._step = counted
            a = Generator(runner, seq, budget=32).generate(prompt, 30)
            b = Generator(runner, staged, budget=32).generate(prompt, 30)
            assert b.token_ids == a.token_ids == _plain(runner, prompt, 30)
            assert b.rounds == a.rounds  # same trees, hence the same acceptance every round
            assert steps["staged"] < steps["seq"]
            t1, t2 = seq.propose(prompt + motif, 16), staged.propose(prompt + motif, 16)
            assert t1.tokens.tolist() == t2.tokens.tolist() and t1.parents.tolist() == t2.parents.tolist()
            assert staged.cached == seq.cached  # the draft caches hold the same tokens afterwards


def test_draft_model_options_are_validated(pair):
    _, same, _ = pair
    with pytest.raises(ValueError, match="min_prob"):
        DraftModelDrafter(same, depth=4, min_prob=1.5)


def test_tree_shape_and_budget(pair):
    _, same, _ = pair
    d = DraftModelDrafter(same, depth=5, width=3)
    tree = d.propose(list(range(20, 30)), budget=16)  # 1 + 5 * 3 nodes fit
    assert tree.num_nodes == 16 and int(tree.depths.max()) == 5
    small = d.propose(list(range(20, 30)), budget=11)  # depth is kept, siblings go first
    assert small.num_nodes == 11 and int(small.depths.max()) == 5
    for kids in tree.children():
        toks = [int(tree.tokens[k]) for k in kids]
        assert len(toks) == len(set(toks)) and len(toks) in (0, 3)
    assert d.propose(list(range(20, 30)), budget=1).num_nodes == 1


@pytest.mark.parametrize("which", ["same", "other"])
def test_sampling_first_two_tokens_match_the_target(pair, which):
    """Joint law of the first two sampled tokens == the warped target's, by a G-test."""
    target, same, other = pair
    params = dict(temperature=0.8, top_k=4)
    prompt = [5, 17, 33, 2, 60, 41]
    runner = TargetRunner(target.model, max_len=64)

    def dist(ids):
        runner.reset()
        runner.prefill(ids[:-1])
        return warp_probs(runner.step(ids[-1]).double().view(1, -1), SamplingParams(**params))[0]

    p1 = dist(prompt)
    exact = torch.zeros(97 * 97, dtype=torch.float64)
    for x in torch.nonzero(p1).flatten().tolist():
        exact[x * 97: (x + 1) * 97] = p1[x] * dist(prompt + [x])
    drafter = DraftModelDrafter(same if which == "same" else other, depth=2, width=2)
    gen = Generator(runner, drafter, budget=5)
    runs = 700
    codes = torch.empty(runs, dtype=torch.long)
    accepted = 0
    for i in range(runs):
        res = gen.generate(prompt, 2, SamplingParams(seed=10_000 + i, **params))
        codes[i] = res.token_ids[0] * 97 + res.token_ids[1]
        accepted += res.rounds == 1
    assert g_test(codes, exact) > 1e-3
    if which == "same":
        assert accepted > runs // 5  # drafts really were accepted under sampling


def test_tokenizer_mismatch_and_missing_draft_model_are_refused(pair, default_ckpt):
    target, _, _ = pair
    real = load_model(str(default_ckpt), "fp32")
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        check_same_tokenizer(real, target)
    with pytest.raises(ValueError, match="--draft-model"):
        make_drafter("draft-model", target)


def test_cli_draft_options_reach_the_drafter(pair):
    from paratree.cli import _drafter_options, build_parser

    args = build_parser().parse_args(["generate", "x", "--drafter", "draft-model", "--draft-model", "m",
                                      "--draft-depth", "6", "--draft-min-prob", "0.3", "--draft-lookup", "0"])
    assert _drafter_options(args) == {"draft_model": "m", "draft_width": 1, "draft_depth": 6,
                                      "draft_min_prob": 0.3, "draft_lookup": 0}
    defaults = _drafter_options(build_parser().parse_args(["generate", "x", "--drafter", "draft-model"]))
    assert set(defaults) == {"draft_model", "draft_width"}  # the drafter's own defaults apply
    target, same, _ = pair
    import paratree.drafters as drafters

    dm_family._DRAFT_LMS[("tiny-same", torch.float64)] = same
    try:
        d = make_drafter("draft-model", target, draft_model="tiny-same")
        assert (d.depth, d.min_prob, d.lookup.max_depth) == (dm_family.DRAFT_DEPTH, dm_family.DRAFT_MIN_PROB,
                                                              dm_family.DRAFT_LOOKUP)
        assert make_drafter("draft-model", target, draft_model="tiny-same", draft_lookup=0).lookup is None
    finally:
        del dm_family._DRAFT_LMS[("tiny-same", torch.float64)]
