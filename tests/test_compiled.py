"""`--compile` (TorchInductor) verify path: exact in float64 against HF and the eager runner, and safe
when compilation fails."""

import pytest
import torch
from hypothesis import given, settings

from hf_oracle import fp64_exact, load_hf
from paratree.bench.suite import ForwardCounter
from paratree.models.compiled import CompiledDecoder, compiler_available
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.models.transformer import linear_kernels
from test_runner import _own_greedy, trees

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="TorchInductor needs a C++ compiler")


@pytest.fixture(scope="module")
def compiled_qwen3(tiny_ckpts):
    """Qwen3 has every piece the graph must get right: q/k norms, GQA, tied embeddings off."""
    return load_model(str(tiny_ckpts["qwen3"]), "fp64", tokenizer=False, compile=True)


@needs_compiler
def test_compiled_greedy_matches_hf_generate_fp64(compiled_qwen3, tiny_ckpts):
    lm = compiled_qwen3
    assert linear_kernels(lm.model) == ("inductor-stock", ())  # calibration profiles are keyed apart
    runner = TargetRunner(lm.model, max_len=256)
    prompt = torch.randint(0, lm.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with fp64_exact(), torch.no_grad():
        ref = load_hf(tiny_ckpts["qwen3"]).generate(prompt, max_new_tokens=40, do_sample=False, min_new_tokens=40,
                                                   pad_token_id=0, eos_token_id=None)[0, 12:].tolist()
    counter, calls0 = ForwardCounter(lm.model), lm.model.compiled.calls
    assert _own_greedy(runner, prompt[0].tolist(), 40) == ref
    # One prefill (eager, hooked) plus one graph call per step: the graph bypasses hooks, and
    # bench's tokens/forward must still count it.
    assert lm.model.compiled.calls - calls0 == 40 and counter.n == 41
    counter.close()
    assert lm.model.compiled.failed is None


@needs_compiler
def test_compiled_tree_verify_taps_and_commit_equal_eager_fp64(compiled_qwen3, tiny_ckpts):
    lm = compiled_qwen3
    eager = load_model(str(tiny_ckpts["qwen3"]), "fp64", tokenizer=False)
    runner, ref = TargetRunner(lm.model, max_len=256), TargetRunner(eager.model, max_len=256)
    prefix = torch.randint(0, lm.config.vocab_size, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    taps = (0, lm.config.num_layers - 1)

    @settings(max_examples=12, deadline=None)
    @given(trees(lm.config.vocab_size))
    def check(case):
        tree, leaf = case
        for r in (runner, ref):
            r.reset()
            r.prefill(prefix)
        got, want = runner.verify(tree, taps=taps), ref.verify(tree, taps=taps)
        assert (got.logits - want.logits).abs().max() < 1e-8
        assert (got.taps - want.taps).abs().max() < 1e-8
        path = tree.path_to(leaf)
        runner.commit(path)
        ref.commit(path)
        n = runner.lengths[0]
        assert n == ref.lengths[0] == len(prefix) + len(path)
        assert (runner.k[:, :, :, :n] - ref.k[:, :, :, :n]).abs().max() < 1e-10
        assert (runner.v[:, :, :, :n] - ref.v[:, :, :, :n]).abs().max() < 1e-10

    check()
    assert lm.model.compiled.failed is None


def test_a_failing_compile_falls_back_to_eager_once_and_stays_exact(tiny_ckpts, monkeypatch):
    monkeypatch.setattr("paratree.models.compiled.compiler_available", lambda: True)
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False, compile=True)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no C++ toolchain\nlong inductor log")

    lm.model.compiled._fn = broken
    eager = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    runner, ref = TargetRunner(lm.model, max_len=64), TargetRunner(eager.model, max_len=64)
    prompt = list(range(3, 11))
    with pytest.warns(UserWarning, match="torch.compile failed, running eagerly"):
        got = _own_greedy(runner, prompt, 8)
    assert got == _own_greedy(ref, prompt, 8)
    assert calls == [1] and "no C++ toolchain" in lm.model.compiled.failed
    # A failed call wrote nothing: the cache holds what the eager runner's does.
    n = runner.lengths[0]
    assert (runner.k[:, :, :, :n] - ref.k[:, :, :, :n]).abs().max() == 0


def test_compile_without_a_compiler_is_a_clear_error(tiny_ckpts, monkeypatch):
    monkeypatch.setattr("paratree.models.compiled.compiler_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a C.. compiler"):
        load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False, compile=True)


def test_compiled_decoder_leaves_an_empty_prefix_to_the_eager_forward(tiny_ckpts, monkeypatch):
    monkeypatch.setattr("paratree.models.compiled.compiler_available", lambda: True)
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    dec = CompiledDecoder(lm.model)
    runner = TargetRunner(lm.model, max_len=16)
    assert dec(torch.tensor([[1]]), torch.tensor([[0]]), runner.k, runner.v, 0, None) is None
    assert dec(torch.tensor([[1], [2]]), torch.tensor([[1], [1]]), runner.k, runner.v, 1, None) is None
