"""The own runner against HF transformers in float64: prefill, greedy decoding, tree verify, commit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_oracle import fp64_exact, load_hf
from paratree.models.loader import load_model
from paratree.models.runner import ContextOverflowError, TargetRunner, greedy_tokens
from paratree.tree.draft_tree import DraftTree

ARCHS = ["llama", "qwen2", "qwen3"]


def _runner(path, max_len=256):
    lm = load_model(str(path), "fp64", tokenizer=False)
    return lm, TargetRunner(lm.model, max_len=max_len)


def _own_greedy(runner, prompt, n):
    return greedy_tokens(runner, prompt, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_hf(tiny_ckpts, arch):
    lm, runner = _runner(tiny_ckpts[arch])
    ids = torch.randint(0, lm.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with fp64_exact(), torch.no_grad():
        ref = load_hf(tiny_ckpts[arch])(ids).logits[0]
    runner.prefill(ids[0, :-1].tolist())
    tree = DraftTree.chain([int(ids[0, -1])])
    got = runner.verify(tree).logits[0]
    assert (got - ref[-1]).abs().max() < 1e-8
    # A multi-token chain verify reproduces every row, not only the last.
    runner.reset()
    runner.prefill(ids[0, :10].tolist())
    got = runner.verify(DraftTree.chain(ids[0, 10:].tolist())).logits
    assert (got - ref[10:]).abs().max() < 1e-8


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_64_tokens_match_hf_generate(tiny_ckpts, arch):
    lm, runner = _runner(tiny_ckpts[arch])
    prompt = torch.randint(0, lm.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with fp64_exact(), torch.no_grad():
        hf = load_hf(tiny_ckpts[arch])
        ref = hf.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64, pad_token_id=0,
                          eos_token_id=None)[0, 12:].tolist()
    assert _own_greedy(runner, prompt[0].tolist(), 64) == ref


@st.composite
def trees(draw, vocab):
    n = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    depths = [0]
    for i in range(1, n):
        depths.append(depths[parents[i]] + 1)
    toks = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    leaf = draw(st.integers(0, n - 1))
    return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths)), leaf


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_verify_matches_path_decoding_and_commit_matches_cache(tiny_ckpts, arch):
    lm, runner = _runner(tiny_ckpts[arch])
    ref_runner = TargetRunner(lm.model, max_len=256)
    prefix = torch.randint(0, lm.config.vocab_size, (9,), generator=torch.Generator().manual_seed(3)).tolist()

    @settings(max_examples=25, deadline=None)
    @given(trees(lm.config.vocab_size))
    def check(case):
        tree, leaf = case
        runner.reset()
        runner.prefill(prefix)
        out = runner.verify(tree).logits
        for i in range(tree.num_nodes):
            path = tree.tokens[tree.path_to(i)].tolist()
            ref_runner.reset()
            ref_runner.prefill(prefix + path[:-1])
            ref = ref_runner.verify(DraftTree.chain([path[-1]])).logits[0]
            assert (out[i] - ref).abs().max() < 1e-8
        path = tree.path_to(leaf)
        runner.commit(path)
        ref_runner.reset()
        ref_runner.prefill(prefix + tree.tokens[path].tolist())
        n = len(prefix) + len(path)
        assert runner.lengths[0] == ref_runner.lengths[0] == n
        assert (runner.k[:, :, :, :n] - ref_runner.k[:, :, :, :n]).abs().max() < 1e-10
        assert (runner.v[:, :, :, :n] - ref_runner.v[:, :, :, :n]).abs().max() < 1e-10

    check()


def test_taps_are_residual_stream_after_layer(tiny_ckpts):
    lm, runner = _runner(tiny_ckpts["llama"])
    ids = torch.arange(5, 25).view(1, -1)
    with fp64_exact(), torch.no_grad():
        hs = load_hf(tiny_ckpts["llama"])(ids, output_hidden_states=True).hidden_states
    taps = runner.prefill(ids[0].tolist(), taps=(0, 1))  # hs[-1] is post-norm in HF
    ref = torch.cat([hs[1][0], hs[2][0]], dim=-1)
    assert taps.shape == ref.shape
    assert (taps - ref).abs().max() < 1e-8


def test_context_overflow_and_bad_commit_are_refused(tiny_ckpts):
    _, runner = _runner(tiny_ckpts["llama"], max_len=16)
    with pytest.raises(ContextOverflowError):
        runner.prefill(list(range(17)))
    runner.prefill(list(range(10)))
    runner.verify(DraftTree.chain([1, 2, 3]))
    with pytest.raises(ValueError):
        runner.commit([1, 2])
    with pytest.raises(ValueError):
        runner.commit([0, 5])
    assert runner.lengths[0] == 10


@pytest.mark.slow
def test_default_model_matches_hf_fp64(default_ckpt):
    lm, runner = _runner(default_ckpt, max_len=512)
    ids = lm_ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                                  411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2,
                                  198, 1, 520, 9531, 198]])
    with fp64_exact(), torch.no_grad():
        hf = load_hf(default_ckpt)
        ref_logits = hf(ids).logits[0, -1]
        ref = hf.generate(lm_ids, attention_mask=torch.ones_like(lm_ids), max_new_tokens=64, do_sample=False,
                           eos_token_id=None, pad_token_id=2)[0, 37:]
    runner.prefill(ids[0, :-1].tolist())
    assert (runner.verify(DraftTree.chain([int(ids[0, -1])])).logits[0] - ref_logits).abs().max() < 1e-8
    assert _own_greedy(runner, ids[0].tolist(), 64) == ref.tolist()


@pytest.mark.parametrize("dtype,route", [("fp32", "auto"), ("fp32", "onednn"), ("fp32", "mkl"), ("bf16", "auto")])
def test_packed_cpu_linears_match_stock_linears(tiny_ckpts, dtype, route, monkeypatch):
    """Every packed route (oneDNN for bf16; for fp32 the route timed on this CPU, oneDNN's layout, and
    the stock GEMV for 1-2 rows with zero-padded MKL buckets up to 64 rows) computes the same tree
    logits as stock Linears, on both sides of every bucket edge."""
    from paratree.models.kernels import ENV, MKL_BUCKETS
    from paratree.models.transformer import PackedLinear

    monkeypatch.setenv(ENV, route)
    packed = load_model(str(tiny_ckpts["qwen2"]), dtype, tokenizer=False, pack=True)
    stock = load_model(str(tiny_ckpts["qwen2"]), dtype, tokenizer=False, pack=False)
    lin = packed.model.layers[0].attn.wqkv
    if not isinstance(lin, PackedLinear):
        if dtype == "fp32" and route == "auto":  # the timed route may be the stock kernel itself
            assert packed.model.kernel_route is not None and packed.model.kernel_route.name == "stock"
            return
        pytest.skip("oneDNN packing unavailable on this build")
    assert (lin.plain is not None) == (dtype == "fp32")
    if route == "mkl" and torch.backends.mkl.is_available():
        assert lin.buckets == tuple(sorted(MKL_BUCKETS))  # a tiny model: every bucket fits
        assert lin.route.kernel(2) == "stock" and lin.route.kernel(3) == "mkl" and lin.route.kernel(65) == "stock"
    if route == "onednn":
        assert lin.route.kernel(1) == lin.route.kernel(300) == "onednn" and not lin.mkl
    tol = 1e-4 if dtype == "fp32" else 5e-2
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, packed.config.vocab_size, (12,), generator=g).tolist()
    for n in (1, 2, 3, 4, 5, 16, 17, 33, 64, 65):
        tree = DraftTree.chain(torch.randint(0, packed.config.vocab_size, (n,), generator=g).tolist())
        outs = []
        for lm in (packed, stock):
            r = TargetRunner(lm.model, max_len=96)
            r.prefill(prompt)
            outs.append(r.verify(tree).logits.float())
        scale = outs[1].abs().max()
        assert (outs[0] - outs[1]).abs().max() <= tol * scale, n


def test_kernel_route_takes_the_fastest_kernel_per_row_count_within_memory():
    """The route follows the timings, keeps only layouts it uses, and trades copies when memory is short."""
    from paratree.models.kernels import MKL_BUCKETS, ROUTE_POINTS, KernelRoute, choose_route

    # Intel-like: stock fastest at 1-2 rows, MKL from 3 to 64, stock and oneDNN level at 128
    intel = {"stock": {r: 1.0 + r for r in ROUTE_POINTS}, "onednn": {r: 2.6 + 0.6 * r for r in ROUTE_POINTS},
             "mkl": {b: 2.5 + 0.3 * b for b in MKL_BUCKETS}}
    intel["stock"][128] = intel["onednn"][128] = 40.0
    r = choose_route(intel, fit=5)
    assert [r.kernel(n) for n in (1, 2, 3, 4, 5, 8, 64)] == ["stock", "stock", "mkl", "mkl", "mkl", "mkl", "mkl"]
    assert r.buckets == tuple(sorted(MKL_BUCKETS)) and not r.uses_onednn and r.kernel(65) == "stock"
    assert r.name == "stock2-mkl4.8.16.32.64-stock"
    one = choose_route(intel, fit=1)  # one copy: oneDNN serves every row count, MKL one bucket only
    assert one.uses_onednn + len(one.buckets) <= 1
    assert choose_route(intel, fit=0) == KernelRoute((), "stock")
    # AMD AVX2-like: oneDNN fastest everywhere, MKL slowest
    amd = {"stock": {r: 7.0 + r for r in ROUTE_POINTS}, "onednn": {r: 5.0 + 0.3 * r for r in ROUTE_POINTS},
           "mkl": {b: 14.0 + b for b in MKL_BUCKETS}}
    r = choose_route(amd, fit=5)
    assert r == KernelRoute((), "onednn") and r.name == "onednn"
    assert KernelRoute.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="PARATREE_FP32_KERNELS"):
        KernelRoute.fixed("fast")


def test_kernel_timing_weights_outgrow_the_last_level_cache(tmp_path):
    """Timed weights must stream from memory: the largest cache sysfs lists sets their size."""
    from paratree.models.kernels import last_level_cache_bytes

    for idx, size in (("index0", "32K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / idx).mkdir()
        (tmp_path / idx / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "size").write_text("1G\n")
    assert last_level_cache_bytes(tmp_path) == 1 << 30
    assert last_level_cache_bytes(tmp_path / "missing") == 0


@pytest.mark.parametrize("arch,dtype", [("llama", "fp64"), ("qwen2", "fp32"), ("qwen3", "fp64")])
def test_hf_twin_shares_weight_memory_and_equals_from_pretrained(tiny_ckpts, arch, dtype):
    from paratree.models.loader import hf_twin, parse_dtype

    lm = load_model(str(tiny_ckpts[arch]), dtype, tokenizer=False)
    twin = hf_twin(lm)
    extra = [t for m in lm.model.modules() for t in (getattr(m, "plain", None), getattr(m, "bias", None))]
    own = [*lm.model.state_dict().values(), *(t for t in extra if isinstance(t, torch.Tensor))]
    own_storages = {t.untyped_storage().data_ptr() for t in own}
    for name, p in twin.named_parameters():
        assert p.untyped_storage().data_ptr() in own_storages, name
    ids = torch.arange(3, 19).view(1, -1)
    with fp64_exact(), torch.no_grad():
        ref = load_hf(tiny_ckpts[arch]).to(parse_dtype(dtype))(ids).logits
        got = twin(ids).logits
    assert torch.equal(got, ref)


def test_bf16_single_query_attention_agrees_with_fp32(tiny_ckpts):
    """bf16 decode steps attend in fp32 (CPU bf16 SDPA is 4x slower for one query); the result must
    match an fp32 model on the same bf16-rounded weights, alone and batched with per-row masks,
    as closely as the bf16 multi-query (tree) path does."""
    bf = load_model(str(tiny_ckpts["qwen3"]), "bf16", tokenizer=False, pack=False)
    ref = load_model(str(tiny_ckpts["qwen3"]), "bf16", tokenizer=False, pack=False)
    ref.model.float()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, bf.config.vocab_size, (n,), generator=g).tolist() for n in (20, 7, 13)]
    outs = []
    for lm in (bf, ref):
        r = TargetRunner(lm.model, max_len=64, batch_size=3)
        for s, p in enumerate(prompts):
            r.prefill(p[:-1], seq=s)
        one = r.verify(DraftTree.chain([prompts[0][-1]]), seq=0).logits[0].float()
        r.commit([0], seq=0)
        r.reset(0)
        r.prefill(prompts[0][:-1], seq=0)
        batched = r.verify_batch([DraftTree.chain([p[-1]]) for p in prompts], [0, 1, 2]).logits[:, 0].float()
        two = r.verify(DraftTree.chain([prompts[1][-1], 5]), seq=1).logits[0].float()  # bf16 SDPA path
        outs.append((one, batched, two))
    (one, batched, two), (r_one, r_batched, r_two) = outs
    scale = r_one.abs().max()
    tree_err = (two - r_two).abs().max() / scale
    assert (one - r_one).abs().max() / scale <= max(2 * tree_err, 2e-2)
    assert (batched - r_batched).abs().max() / scale <= max(2 * tree_err, 2e-2)
    assert torch.equal(one.argmax(), r_one.argmax())
