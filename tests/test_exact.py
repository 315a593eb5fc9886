"""Exact by construction on the GGUF runtime (`--dtype gguf --exact`, eager or `--compile`): a tree node, a
batched row, a chunked prefill and a speculative round compute bit for bit what plain decoding computes
(`torch.equal`).

Why it holds: the int4 linears reduce each row in a fixed order whatever the row count
(tests/test_quant.py), RMSNorm and the element-wise ops are per row, and attention runs
`exact_attention` (models/attention.py); compiled, the one-token and the tree graph round alike
(models/compiled.py). These tests check the whole forward, and that the check fails on SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.models.attention import KEY_CHUNK, row_invariant_attention
from paratree.tree.draft_tree import DraftTree
from test_runner import trees


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(4, 4), (6, 2), (9, 3), (8, 1)]), st.integers(1, 2), st.integers(1, 3 * KEY_CHUNK + 5),
       st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_attention_rows_do_not_depend_on_other_rows_or_unseen_keys(heads, batch, past, t, seed):
    nh, nkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nh, t, 16, generator=g)
    k = torch.randn(batch, nkv, past + t, 16, generator=g)
    v = torch.randn(batch, nkv, past + t, 16, generator=g)
    mask = torch.ones(batch, 1, t, past + t, dtype=torch.bool)
    mask[..., past:] = torch.rand(t, t, generator=g).lt(0.5).tril(-1) | torch.eye(t, dtype=torch.bool)
    out = row_invariant_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=nh != nkv)
    assert (out.double() - ref).abs().max() < 1e-5
    for b in range(batch):
        for i in range(t):
            seen = mask[b, 0, i].nonzero().flatten()
            # the same query alone, over only the keys it sees, padded with the cache's stale slots
            keys, vals = k[b:b + 1, :, seen], v[b:b + 1, :, seen]
            stale = math.ceil(len(seen) / KEY_CHUNK) * KEY_CHUNK - len(seen) + 3
            keys = torch.cat([keys, torch.randn(1, nkv, stale, 16, generator=g)], 2)
            vals = torch.cat([vals, torch.randn(1, nkv, stale, 16, generator=g)], 2)
            alone_mask = torch.zeros(1, 1, 1, keys.shape[2], dtype=torch.bool)
            alone_mask[..., :len(seen)] = True
            alone = row_invariant_attention(q[b:b + 1, :, i:i + 1], keys, vals, alone_mask)
            assert torch.equal(alone[0, :, 0], out[b, :, i])


@pytest.fixture(scope="module")
def gguf_lm(default_ckpt):
    from paratree.models.loader import load_model

    from paratree.models.transformer import linear_kernels

    lm = load_model(None, "gguf", exact=True)
    assert lm.model.exact
    assert linear_kernels(lm.model)[0] == "int4-exact"  # its own calibration profile
    return lm


def _steps(runner, prefix, tokens):
    """Plain decoding: prefill `prefix`, then one-token steps over `tokens`; logits of each step."""
    runner.reset()
    runner.prefill(prefix)
    return [runner.step(t) for t in tokens]


def _check_tree(runner, ref, prefix, tree, leaf, taps=()):
    """Every node of `tree` verified after `prefix` equals plain decoding of its path, and the cache after
    committing the path to `leaf` equals plain decoding's (`torch.equal`). Returns the mismatching nodes."""
    runner.reset()
    runner.prefill(prefix)
    out = runner.verify(tree, taps=taps).logits
    bad = [i for i in range(tree.num_nodes)
           if not torch.equal(out[i], _steps(ref, prefix, tree.tokens[tree.path_to(i)].tolist())[-1])]
    path = tree.path_to(leaf)
    runner.commit(path)
    _steps(ref, prefix, tree.tokens[path].tolist())
    n = len(prefix) + len(path)
    assert runner.lengths[0] == ref.lengths[0] == n
    if not (torch.equal(runner.k[:, :, :, :n], ref.k[:, :, :, :n]) and torch.equal(runner.v[:, :, :, :n], ref.v[:, :, :, :n])):
        bad.append("cache")
    return bad


def test_tree_nodes_equal_plain_decoding_of_their_paths_and_commit_equals_its_cache(gguf_lm):
    from paratree.models.runner import TargetRunner

    lm = gguf_lm
    runner, ref = TargetRunner(lm.model, max_len=256), TargetRunner(lm.model, max_len=256)
    prefix = torch.randint(0, lm.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()

    @settings(max_examples=8, deadline=None)
    @given(trees(lm.config.vocab_size))
    def check(case):
        assert _check_tree(runner, ref, prefix, *case) == []

    check()


def test_the_check_catches_a_runtime_that_is_not_row_invariant(default_ckpt):
    """The same check on the same model with SDPA attention (not row-invariant) finds differing nodes:
    the exactness tests can fail."""
    from paratree.models.loader import load_model
    from paratree.models.runner import TargetRunner

    lm = load_model(None, "gguf", tokenizer=False, exact=False)
    assert not lm.model.exact
    runner, ref = TargetRunner(lm.model, max_len=256), TargetRunner(lm.model, max_len=256)
    prefix = torch.randint(0, lm.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    tree = DraftTree(torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([-1, 0, 0, 1, 2, 4]), torch.tensor([0, 1, 1, 2, 2, 3]))
    assert _check_tree(runner, ref, prefix, tree, 5)


def int4_model(ckpt):
    """A tiny random checkpoint with every decoder linear on the int4 kernel (round-to-nearest group-32
    codes of its weights) and the LM head packed as on the real model: an exact-capable model of any
    family, small enough to compile in the test suite."""
    from paratree.models.loader import load_model
    from paratree.models.quant import GROUP, Int4Linear
    from paratree.models.transformer import PackedLinear

    lm = load_model(str(ckpt), "bf16", tokenizer=False, pack=False)
    for layer in lm.model.layers:
        for parent in (layer.attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                w = lin.weight.detach().float().view(lin.out_features, -1, GROUP)
                lo, hi = w.amin(-1), w.amax(-1)
                scale = ((hi - lo) / 15).clamp_min(1e-8)
                codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
                setattr(parent, name, Int4Linear.from_codes(codes.view(lin.out_features, -1), scale, lo, lin.bias))
    lm.model.lm_head_packed = PackedLinear(lm.model.lm_head, None)
    lm.model.exact = True
    return lm


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_exact_runtime_tree_nodes_equal_compiled_plain_steps(tiny_ckpts, arch):
    """`--compile` on the exact runtime: one graph for the one-token step and one for every tree size
    (models/compiled.py). Trees at prefix lengths around block boundaries, with taps, equal plain steps."""
    from paratree.models.compiled import CompiledDecoder, compiler_available
    from paratree.models.runner import TargetRunner

    if not compiler_available():
        pytest.skip("no C++ compiler for TorchInductor")
    lm = int4_model(tiny_ckpts[arch])
    lm.model.compiled = CompiledDecoder(lm.model)
    runner, ref = TargetRunner(lm.model, max_len=320), TargetRunner(lm.model, max_len=320)
    runner.warmup((0,))
    gen = torch.Generator().manual_seed(4)
    calls = lm.model.compiled.calls

    @settings(max_examples=12, deadline=None)
    @given(trees(lm.config.vocab_size), st.sampled_from([1, 63, 64, 65, 120, 127, 128, 200]))
    def check(case, n_prefix):
        prefix = torch.randint(0, lm.config.vocab_size, (n_prefix,), generator=gen).tolist()
        assert _check_tree(runner, ref, prefix, *case, taps=(0, 1)) == []

    check()
    assert lm.model.compiled.failed is None and lm.model.compiled.calls > calls  # the graphs ran


def test_chunked_prefill_equals_whole_prefill(gguf_lm):
    from paratree.models.runner import TargetRunner

    lm = gguf_lm
    prompt = torch.randint(0, lm.config.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    a, b = TargetRunner(lm.model, max_len=256), TargetRunner(lm.model, max_len=256)
    a.prefill(prompt, chunk=256)
    b.prefill(prompt, chunk=23)
    assert torch.equal(a.k[:, :, :, :150], b.k[:, :, :, :150]) and torch.equal(a.v[:, :, :, :150], b.v[:, :, :, :150])
    assert torch.equal(a.step(7), b.step(7))


def test_batched_verify_rows_equal_single_sequence_verify(gguf_lm):
    from paratree.models.runner import TargetRunner

    lm = gguf_lm
    gen = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(0, lm.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 90, 40)]
    batch = TargetRunner(lm.model, max_len=256, batch_size=3)
    single = TargetRunner(lm.model, max_len=256)
    tree_list = [DraftTree.chain([11, 12, 13]), DraftTree(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, 0, 0, 1, 2]),
                                                         torch.tensor([0, 1, 1, 2, 2])), DraftTree.chain([3])]
    for s, p in enumerate(prefixes):
        batch.prefill(p, seq=s)
    out = batch.verify_batch(tree_list, [0, 1, 2])
    for s, (p, tree) in enumerate(zip(prefixes, tree_list)):
        single.reset()
        single.prefill(p)
        want = single.verify(tree).logits
        assert torch.equal(out.logits[s, :tree.num_nodes], want), f"sequence {s}"


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "jetspec+ngram", "jetspec", "ddtree", "eagle", "dspark"])
def test_every_drafter_greedy_equals_plain_bit_for_bit(gguf_lm, drafter):
    """The default runtime's promise: speculative greedy output is plain greedy output, token for token,
    on real prompts, with no near-tie excuse (`--budget auto` changes tree shapes round to round)."""
    from paratree.data import load_prompts
    from paratree.drafters import make_drafter
    from paratree.engine.generate import Generator
    from paratree.engine.pipeline import encode_prompt
    from paratree.models.runner import TargetRunner

    lm = gguf_lm
    runner = TargetRunner(lm.model, max_len=1024)
    plain = Generator(runner, make_drafter("plain", lm), eos_ids=lm.eos_ids, budget=1)
    spec = Generator(runner, make_drafter(drafter, lm), eos_ids=lm.eos_ids, budget=12)
    prompts = load_prompts("gsm8k", 2) + load_prompts("humaneval", 1)
    rounds = 0
    for p in prompts:
        ids = encode_prompt(lm.tokenizer, p)
        want = plain.generate(ids, 64).token_ids
        res = spec.generate(ids, 64)
        assert res.token_ids == want
        rounds += res.rounds
    assert rounds < 3 * 64  # drafts were accepted: trees really ran


def test_exact_refuses_what_it_cannot_make_exact(tiny_ckpts):
    from paratree.models.loader import load_model

    with pytest.raises(ValueError, match="needs --dtype gguf"):
        load_model(str(tiny_ckpts["llama"]), "bf16", tokenizer=False, exact=True)


@pytest.mark.slow
def test_server_answers_equal_one_at_a_time_under_concurrency(gguf_lm):
    """8 concurrent greedy requests of mixed lengths (one batched verify forward per round, trees sized
    by the server's policy from its batch) get exactly the answers the same requests get alone."""
    pytest.importorskip("uvicorn")
    import concurrent.futures
    import httpx

    from live_server import serving
    from paratree.data import load_prompts
    from paratree.serve.backend import ServeEngine

    prompts = load_prompts("gsm8k", 4) + load_prompts("mt_bench", 4)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": 12 + 6 * i,
               "temperature": 0} for i, p in enumerate(prompts)]
    engine = ServeEngine(gguf_lm, drafter="jetspec+ngram", budget=12, max_batch=8, max_model_len=768,
                         served_model_name="m")
    with serving(engine) as url, httpx.Client(base_url=url, timeout=300) as cl:
        def ask(body):
            r = cl.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [ask(b) for b in bodies]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, bodies))
    for a, b in zip(alone, together):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    assert sum(b["speculative"]["rounds"] for b in together) < sum(b["usage"]["completion_tokens"] for b in together)
