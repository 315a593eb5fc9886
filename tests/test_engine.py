"""The speculative loop: greedy output identical to plain decoding, exact stopping, seeded sampling."""

import random

import pytest
import torch

from paratree.drafters import NGramDrafter, NoDrafter
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import ContextOverflowError, TargetRunner
from paratree.tree.draft_tree import DraftTree
from paratree.verify.warp import SamplingParams


class ScriptedDrafter:
    """Knows the true continuation; hides it in a random tree among wrong branches.

    The true node is placed at a random position among its siblings, so accepted
    paths are usually non-contiguous in the node list: commit must compact them.
    """

    name = "scripted"
    tap_layers = ()

    def __init__(self, prompt, truth, vocab, seed=0):
        self.full, self.n_prompt, self.vocab = list(prompt) + list(truth), len(prompt), vocab
        self.rng = random.Random(seed)

    def begin(self, prompt_ids, prompt_taps):
        assert list(prompt_ids) == self.full[: len(prompt_ids)]

    def update(self, new_tokens, new_taps):
        pass

    def propose(self, tokens, budget):
        pos = len(tokens)
        toks, parents, depths = [tokens[-1]], [-1], [0]
        node, d = 0, 0
        while len(toks) < budget and pos + d < len(self.full):
            right = self.full[pos + d] if self.rng.random() < 0.85 else (self.full[pos + d] + 1) % self.vocab
            wrong = [(right + k) % self.vocab for k in (3, 7)]
            kids = [right] + wrong[: self.rng.randint(0, 2)]
            self.rng.shuffle(kids)
            nxt = None
            for t in kids:
                if len(toks) >= budget:
                    break
                toks.append(t), parents.append(node), depths.append(d + 1)
                if t == right:
                    nxt = len(toks) - 1
            if nxt is None:
                break
            node, d = nxt, d + 1
        return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths))


def _plain(runner, prompt, n, eos=()):
    return Generator(runner, NoDrafter(), eos_ids=set(eos)).generate(prompt, n).token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_speculative_greedy_equals_plain_fp64(tiny_ckpts, arch):
    lm = load_model(str(tiny_ckpts[arch]), "fp64", tokenizer=False)
    runner = TargetRunner(lm.model, max_len=256)
    g = torch.Generator().manual_seed(5)
    for trial in range(4):
        prompt = torch.randint(0, lm.config.vocab_size, (10,), generator=g).tolist()
        truth = _plain(runner, prompt, 48)
        drafter = ScriptedDrafter(prompt, truth, lm.config.vocab_size, seed=trial)
        res = Generator(runner, drafter, budget=16).generate(prompt, 48)
        assert res.token_ids == truth
        assert res.rounds < 48 and res.tau > 1.5  # the tree really was used
        # n-gram drafting over the same prompt also reproduces plain output
        assert Generator(runner, NGramDrafter(), budget=16).generate(prompt + prompt, 40).token_ids == \
            _plain(runner, prompt + prompt, 40)


def test_eos_inside_tree_and_max_tokens_are_exact(tiny_ckpts):
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    runner = TargetRunner(lm.model, max_len=256)
    prompt = list(range(10, 22))
    truth = _plain(runner, prompt, 40)
    eos = truth[17]  # pretend this token is EOS: plain decoding stops right there
    stop_at = truth.index(eos) + 1
    for n in (1, 5, 13, 40):
        res = Generator(runner, ScriptedDrafter(prompt, truth, lm.config.vocab_size), eos_ids={eos},
                        budget=12).generate(prompt, n)
        expect = truth[: min(n, stop_at)]
        assert res.token_ids == expect
        assert res.finish_reason == ("stop" if n >= stop_at else "length")


def test_sampling_is_seeded_and_valid(tiny_ckpts):
    lm = load_model(str(tiny_ckpts["qwen3"]), "fp64", tokenizer=False)
    runner = TargetRunner(lm.model, max_len=256)
    prompt = list(range(30))
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    gen = Generator(runner, NGramDrafter(), budget=8)
    a, b = gen.generate(prompt, 30, p).token_ids, gen.generate(prompt, 30, p).token_ids
    assert a == b
    c = gen.generate(prompt, 30, SamplingParams(temperature=0.9, top_p=0.9, seed=99)).token_ids
    assert c != a
    with pytest.raises(ValueError):
        gen.generate(prompt, 5, SamplingParams(temperature=-1))
    with pytest.raises(ValueError):
        gen.generate(prompt, 5, SamplingParams(top_p=0))


def test_context_window_is_enforced(tiny_ckpts):
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    gen = Generator(TargetRunner(lm.model, max_len=32), NGramDrafter(), budget=32)
    with pytest.raises(ContextOverflowError):
        gen.generate(list(range(30)), 5)
    # fits exactly: the tree budget shrinks near the end of the window instead of overflowing
    assert len(gen.generate(list(range(20)) * 1, 12).token_ids) == 12


def test_ngram_tree_has_distinct_siblings_and_respects_budget():
    d = NGramDrafter(max_ngram=2, max_depth=5)
    ctx = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 9, 1, 2]
    for budget in (1, 2, 4, 8, 32):
        t = d.propose(ctx, budget)
        assert t.num_nodes <= budget and int(t.tokens[0]) == 2
        for p in set(t.parents.tolist()):
            kids = t.tokens[t.parents == p].tolist()
            assert len(kids) == len(set(kids))
    t = d.propose(ctx, 32)
    # continuations after "1 2": [3 9 1 2], [5 6 1 2 3], [3 4 1 2 5]: depth-1 children are {3, 5}
    assert sorted(t.tokens[t.parents == 0].tolist()) == [3, 5]
