"""The draft-model drafter: a small LM with its own KV cache, lossless through the verification core."""

import pytest
import torch

from hf_oracle import make_tiny_checkpoint
from paratree.drafters import NoDrafter, make_drafter
from paratree.drafters.draft_model import DraftModelDrafter, TokenizerMismatchError, check_same_tokenizer
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
