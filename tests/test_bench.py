"""`paratree bench` / `paratree calibrate` / `--budget auto`, in-process on a tiny random model.

The tiny model has a 512-token byte-level BPE tokenizer (trained here in ~0.2 s on the
vendored prompts) with a ChatML template, so the whole path (datasets, chat template,
own runner, HF generate, report) runs for real in a few seconds.
"""

import io
import json
import math
import re
import os
import sys
from pathlib import Path

import pytest
import torch

from paratree import data as datasets
from paratree.bench.suite import BenchConfig, expand_methods, parse_budgets, parse_heads, run_bench
from paratree.tree.cost import VerifyCostModel

REQUIRED = ("method", "dataset", "tau", "tokens_per_s", "speedup", "greedy_mismatches", "tokens_per_forward",
            "accept_by_depth", "draft_s", "verify_s", "mean_tree_size", "peak_rss_mb", "n_prompts", "new_tokens",
            "target_forwards", "budget", "kind")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private paratree cache (profiles land here), shared by this module's tests."""
    root = tmp_path_factory.mktemp("ptcache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PARATREE_CACHE", str(root))
    yield root
    mp.undo()


def _consoles():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def quick_run(tiny, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchout")
    custom = out / "custom.jsonl"
    custom.write_text("\n".join(json.dumps({"instruction": f"Repeat the word {w} three times.", "input": ""})
                                for w in ("apple", "river")) + "\n")
    cfg = BenchConfig(datasets=["gsm8k", str(custom)], model=tiny, dtype="fp32", quick=True,
                      methods=["plain", "hf", "hf-pld", "hf-assisted", "ngram", "ngram-chain@8"],
                      json_out=str(out / "rows.json"), report_dir=str(out / "report"), progress=False,
                      command="paratree bench --quick (test)")
    err, std = _consoles()
    res = run_bench(cfg, console=err, out_console=std)
    return res, out, std.file.getvalue()


def test_bench_rows_have_required_fields_and_sane_values(quick_run):
    res, out, table = quick_run
    rows = json.loads((out / "rows.json").read_text())
    assert rows == json.loads(json.dumps(res.rows, default=str)) and not res.interrupted
    methods = {r["method"] for r in rows}
    assert methods == {"plain", "hf", "hf-pld", "ngram@32", "ngram@auto", "ngram-chain@8"}
    assert {r["dataset"] for r in rows} == {"gsm8k", str(out / "custom.jsonl")}
    assert any("hf-assisted skipped" in n for n in res.notes)
    for r in rows:
        for k in REQUIRED:
            assert k in r, (k, r["method"])
        assert r["n_prompts"] == 2 and 0 < r["new_tokens"] <= 2 * 32
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["tokens_per_forward"] <= 32
        assert r["greedy_mismatches"] is not None and 0 <= r["greedy_mismatches"] <= 2
        if r["kind"] == "paratree":
            assert r["tau"] >= 1.0 and r["rounds"] >= 1 and r["draft_s"] >= 0 and r["verify_s"] > 0
            assert r["draft_per_verify"] == pytest.approx(r["draft_s"] / r["verify_s"])
            acc = r["accept_by_depth"]
            assert all(0 <= a <= 1 for a in acc) and acc == sorted(acc, reverse=True)
            bound = 256 if r["budget"] == "auto" else r["budget"]
            assert 1 <= r["mean_tree_size"] <= bound
        else:
            assert r["tau"] is None and r["accept_by_depth"] is None
    for r in rows:
        if r["method"] == "plain":
            assert r["speedup"] == 1.0 and r["greedy_mismatches"] == 0 and r["tau"] == 1.0
            assert r["mean_tree_size"] == 1.0
        if r["method"].startswith("ngram") or r["method"] == "hf":  # fp32: token-for-token plain
            assert r["greedy_mismatches"] == 0, r["method"]
    auto = [r for r in rows if r["budget"] == "auto"]
    assert auto and all(Path(r["profile"]).is_file() for r in auto)
    assert "ngram@auto" in table and "speedup" in table
    assert "ngram: auto" in table and "the best fixed budget (@32)" in table


def test_bench_report_files(quick_run):
    res, out, _ = quick_run
    rep = out / "report"
    md = (rep / "report.md").read_text()
    for png in ("speedup.png", "tau_vs_budget.png", "acceptance_by_depth.png", "verify_latency.png"):
        data = (rep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in md
    assert "paratree bench --quick (test)" in md and "| gsm8k | plain |" in md and "bonus" in md
    ngram = next(ln for ln in md.splitlines() if ln.startswith("| gsm8k | ngram@auto |"))
    assert re.search(r"\d+\.\d\d / \d+\.\d\d \(\d+%\)", ngram)  # draft s / verify s (draft ÷ verify)
    assert "Calibration profile" in md
    assert "Budget sweep" in md and "| gsm8k | ngram |" in md  # ngram@auto against ngram@32
    assert json.loads((rep / "results.json").read_text())[0]["method"] == "plain"


def test_budget_sweep_compares_auto_with_every_fixed_budget():
    from paratree.bench.report import budget_sweep

    def row(ds, drafter, budget, tps):
        return {"kind": "paratree", "dataset": ds, "drafter": drafter, "budget": budget, "tokens_per_s": tps,
                "mean_tree_size": 5.0}

    rows = [row("a", "plain", 1, 10.0), row("a", "j", 8, 20.0), row("a", "j", 32, 25.0), row("a", "j", 128, 12.0),
            row("a", "j", "auto", 24.0), row("b", "j", 16, 30.0), row("b", "j", "auto", 27.0),
            row("b", "k", 16, 9.0), {"kind": "hf", "dataset": "a", "drafter": None, "budget": None, "tokens_per_s": 50}]
    got = {(s["dataset"], s["drafter"]): s for s in budget_sweep(rows)}
    assert set(got) == {("a", "j"), ("b", "j")}  # k has no auto row; plain and HF rows are no drafters
    a, b = got["a", "j"], got["b", "j"]
    assert a["best_budget"] == 32 and a["auto_vs_best"] == pytest.approx(0.96) and a["within_tolerance"]
    assert a["auto_vs_128"] == pytest.approx(2.0)
    assert b["auto_vs_best"] == pytest.approx(0.9) and not b["within_tolerance"] and b["auto_vs_128"] is None


def test_jsonl_field_detection_and_clear_error(tmp_path, capsys):
    cases = {
        "prompt": [{"prompt": "a"}, {"prompt": "b"}],
        "question": [{"question": "q1", "answer": "x"}],
        "problem": [{"problem": "p1", "solution": "s"}],
        "instruction": [{"instruction": "do it", "input": "ctx"}, {"instruction": "plain", "input": ""}],
        "turns": [{"turns": ["first", "second"]}],
    }
    for field, rows in cases.items():
        f = tmp_path / f"{field}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        got = datasets.load_prompts(str(f))
        assert len(got) == len(rows), field
    assert datasets.load_prompts(str(tmp_path / "instruction.jsonl")) == ["do it\n\nctx", "plain"]
    assert datasets.load_prompts(str(tmp_path / "turns.jsonl")) == ["first"]
    assert datasets.load_prompts("gsm8k", limit=3) and len(datasets.load_prompts("mt_bench", limit=2)) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    with pytest.raises(ValueError, match="no prompt field"):
        datasets.load_prompts(str(bad))
    from paratree.cli import main

    # the dataset is read before any model loads, and the error is one clear line
    assert main(["bench", "--dataset", f"gsm8k,{bad}", "--quick", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paratree: error:") and "no prompt field" in err[0]
    assert main(["bench", "--dataset", "nope", "--quick"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_method_and_budget_parsing(monkeypatch):
    specs, notes = expand_methods(["ngram@16", "hf", "ngram-chain"], [8, "auto"])
    assert [s.label for s in specs] == ["plain", "ngram@16", "hf", "ngram-chain@8", "ngram-chain@auto"]
    assert any("plain added" in n for n in notes)
    assert parse_budgets("8, 16,auto,8") == [8, 16, "auto"]
    assert parse_heads(["jetspec=/a", "/b"]) == {"jetspec": "/a", "*": "/b"} and parse_heads(None) is None
    with pytest.raises(ValueError, match="budget"):
        parse_budgets("0")
    with pytest.raises(ValueError, match="unknown method"):
        expand_methods(["nosuch"], [32])
    with pytest.raises(ValueError, match="no @budget"):
        expand_methods(["hf@8"], [32])
    specs, _ = expand_methods(["plain", "plain~inexact", "ngram@8~inexact", "ngram~inexact"], [4, "auto"])
    assert [(s.label, s.variant) for s in specs] == [
        ("plain", ""), ("plain~inexact", "inexact"), ("ngram@8~inexact", "inexact"), ("ngram@4~inexact", "inexact"),
        ("ngram@auto~inexact", "inexact")]
    with pytest.raises(ValueError, match="take a variant"):
        expand_methods(["hf~inexact"], [32])
    with pytest.raises(ValueError, match="take a variant"):
        expand_methods(["ngram@8~fast"], [32])
    # drafters registered later are benchmarked with no change here
    from paratree.drafters import NoDrafter
    from paratree.drafters.registry import DrafterSpec, register_drafter, unregister

    register_drafter(DrafterSpec("future-head", lambda ctx: NoDrafter()))
    try:
        specs, _ = expand_methods(None, [32])
    finally:
        unregister("future-head")
    labels = [s.label for s in specs]
    assert "future-head@32" in labels and "ngram@32" in labels and "hf-pld" in labels
    assert "hf-assisted" not in labels
    specs, _ = expand_methods(None, [32], assistant="some/model")
    assert "hf-assisted" in [s.label for s in specs]


def test_calibrate_writes_monotone_profile(tiny, cache, capsys):
    from paratree.cli import main
    from paratree.engine.costs import load_profile, profile_path
    from paratree.models.loader import load_model

    assert main(["calibrate", "--model", tiny, "--dtype", "bf16", "--sizes", "1,4,16,64,256", "--repeats",
                 "5"]) == 0
    out = capsys.readouterr().out
    assert "profile:" in out and "ms / node" in out
    lm = load_model(tiny, "bf16")
    path = profile_path(lm)
    assert path.is_file() and path.parent == Path(os.environ["PARATREE_CACHE"]) / "profiles"
    assert "tiny" in path.name and "bf16" in path.name
    prof = load_profile(path)
    ns = [n for n, _ in prof["verify_points"]]
    secs = [s for _, s in prof["verify_points"]]
    assert ns == [1, 4, 16, 64, 256] and all(s > 0 for s in secs)
    assert secs[-1] > secs[0]  # monotone-ish: 256 nodes cost more than one
    model = [s for _, s in prof["verify_model"]]
    assert model == sorted(model)
    assert prof["draft"]["ngram"]["seconds"] > 0 and prof["round_overhead_s"] >= 0


def test_fp32_profile_is_keyed_by_kernels_and_measures_bucket_edges(tiny, cache, tmp_path, monkeypatch):
    from paratree.engine.costs import calibrate, calibration_sizes, profile_path
    from paratree.models.kernels import ENV
    from paratree.models.loader import load_model
    from paratree.models.transformer import linear_kernels

    monkeypatch.setenv(ENV, "mkl")  # the bucketed route, whatever this CPU's timed route is
    packed, stock = load_model(tiny, "fp32", pack=True), load_model(tiny, "fp32", pack=False)
    assert profile_path(packed) != profile_path(stock)  # a kernel change never reuses a stale curve
    kind, buckets = linear_kernels(packed.model)
    if "mkl" not in kind:
        pytest.skip("MKL packed sgemm unavailable on this build")
    assert linear_kernels(stock.model) == ("stock", ())
    assert "mkl" in profile_path(packed).name and "stock" in profile_path(stock).name
    sizes = calibration_sizes(packed, [1, 256])
    assert all(b in sizes and b + 1 in sizes for b in buckets) and calibration_sizes(stock, [1, 256]) == [1, 256]
    prof = calibrate(packed, sizes=[1, 8], max_nodes=9, repeats=1, drafters=["ngram"], path=tmp_path / "p.json")
    assert [n for n, _ in prof["verify_points"]] == sorted({1, 8} | {b for b in buckets if b <= 9}
                                                          | {b + 1 for b in buckets if b + 1 <= 9})
    assert prof["linear_kernels"] == [kind, list(buckets)]


def _random_tree(n, seed=0, cum=True):
    from paratree.tree.builders import build_best_first

    g = torch.Generator().manual_seed(seed)
    t = build_best_first(3, torch.randn(10, 50, generator=g) * 3, budget=n, max_depth=10, width=4, keep_q=False)
    if not cum:
        t.cum_logp = None
    return t


def test_auto_sizer_prunes_to_budget_and_learns():
    from paratree.engine.sizing import AutoSizer

    steep = VerifyCostModel([(1, 1e-3), (8, 1.1e-3), (32, 3e-3), (64, 10e-3), (256, 100e-3)])
    sizer = AutoSizer(steep, fixed_seconds=0.5e-3, max_nodes=64)
    tree = _random_tree(200)
    out = sizer(tree)
    assert 1 <= out.num_nodes <= 64 and out.num_nodes < tree.num_nodes
    assert torch.equal(out.tokens, tree.tokens[: out.num_nodes]) and torch.equal(
        out.parents, tree.parents[: out.num_nodes])
    out.validate()
    # flat cost: keep everything up to max_nodes
    flat = AutoSizer(VerifyCostModel([(1, 1e-3), (256, 1e-3)]), max_nodes=32)
    assert flat(_random_tree(100)).num_nodes == 32

    # no cum_logp: an empirical per-(depth, rank) table, optimistic at first ...
    learn = AutoSizer(VerifyCostModel([(1, 1e-3), (16, 1.5e-3), (64, 4e-3)]), max_nodes=64)
    t = _random_tree(40, seed=1, cum=False)
    first = learn(t).num_nodes
    assert first > 1
    # ... and after every draft is rejected, trees shrink to the root
    kids0 = {int(t.tokens[c]) for c in t.children()[0]}
    miss = next(x for x in range(50) if x not in kids0)
    for _ in range(200):
        pruned = learn(t)
        learn.observe(pruned, [0], [miss])
    assert learn(t).num_nodes < first and learn(t).num_nodes == 1
    # and after the rank-0 chain is always accepted, it comes back
    chain, node = [0], 0
    kids = t.children()
    while kids[node]:
        node = kids[node][0]
        chain.append(node)
    for _ in range(400):
        learn(t)
        learn.observe(t, chain, [int(t.tokens[c]) for c in chain[1:]] + [miss])
    assert learn(t).num_nodes > 1


def test_generate_with_auto_budget_is_lossless(tiny, cache, capsys):
    from paratree.cli import main
    from paratree.drafters import NGramDrafter, NoDrafter
    from paratree.engine.generate import Generator
    from paratree.engine.pipeline import encode_prompt
    from paratree.engine.costs import CostService
    from paratree.models.loader import load_model
    from paratree.models.runner import TargetRunner

    lm = load_model(tiny, "fp32")
    costs = CostService(lm)
    sizer = costs.auto_sizer("ngram")  # no fp32 profile yet: a short calibration runs
    assert Path(costs.profile()["path"]).is_file() and sizer.max_nodes == 256
    assert set(costs.profile()["draft"]) == {"ngram"}  # a first run times only the drafter in use
    costs.auto_sizer("ngram-chain")  # another drafter is timed once and stored with the profile
    assert set(CostService(lm).profile()["draft"]) == {"ngram", "ngram-chain"}
    ids = encode_prompt(lm.tokenizer, datasets.load_prompts("gsm8k", 1)[0])
    runner = TargetRunner(lm.model, max_len=len(ids) + 48 + 300)
    plain = Generator(runner, NoDrafter(), eos_ids=lm.eos_ids).generate(ids, 48)
    auto = Generator(runner, NGramDrafter(), eos_ids=lm.eos_ids, budget=sizer.max_nodes, sizer=sizer).generate(ids, 48)
    assert auto.token_ids == plain.token_ids
    assert len(sizer.kept_nodes) == auto.rounds - sizer.gate.skipped  # gated-off rounds draft nothing
    assert all(k <= p for k, p in zip(sizer.kept_nodes, sizer.proposed_nodes))
    assert max(auto.tree_sizes) <= 256

    assert main(["generate", "Tell me about apples.", "--model", tiny, "--dtype", "fp32", "--budget", "auto",
                 "--max-new-tokens", "12", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["num_new_tokens"] >= 1 and got["tau"] >= 1.0
    assert main(["generate", "Tell me about apples.", "--model", tiny, "--dtype", "fp32", "--max-new-tokens", "12",
                 "--json"]) == 0  # default fixed budget still works
    assert json.loads(capsys.readouterr().out)["token_ids"] == got["token_ids"]
    assert main(["generate", "hi", "--model", tiny, "--budget", "lots"]) == 2
    assert "budget" in capsys.readouterr().err


def test_interrupt_leaves_valid_partial_output(tiny, cache, tmp_path, monkeypatch):
    from paratree.bench import suite

    real_run_hf, calls = suite.Bench.run_hf, []

    def boom(self, *a, **k):  # Ctrl-C in hf's second repeat: warm-up, repeat 1, then this
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_hf(self, *a, **k)

    monkeypatch.setattr(suite.Bench, "run_hf", boom)
    cfg = BenchConfig(datasets=["mt_bench"], model=tiny, dtype="fp32", methods=["plain", "hf", "ngram@8"],
                      limit=1, max_new_tokens=8, repeats=2, json_out=str(tmp_path / "rows.json"),
                      report_dir=str(tmp_path / "rep"), progress=False)
    err, std = _consoles()
    res = run_bench(cfg, console=err, out_console=std)
    assert res.interrupted
    rows = json.loads((tmp_path / "rows.json").read_text())
    # plain had finished its second repeat, hf and ngram had not: the unfinished repeat is dropped
    # for everyone, so every method is measured on the same (first) repeat
    assert [r["method"] for r in rows] == ["plain", "hf", "ngram@8"]
    assert all(r["repeats_run"] == 1 and r["warmup_excluded"] is False and r["n_prompts"] == 1 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[2]["greedy_mismatches"] == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "partial" in md and "| mt_bench | plain |" in md


def test_exact_and_inexact_targets_run_in_one_bench(default_ckpt, tmp_path):
    """`~inexact` methods run on a second load of the target with exactness off, in the same process,
    so the price of exactness is measured against the non-exact runtime in one run."""
    cfg = BenchConfig(datasets=["gsm8k"], dtype="gguf", exact=True, limit=1, max_new_tokens=24, repeats=1,
                      methods=["plain", "ngram@6", "plain~inexact", "ngram@6~inexact"], progress=False)
    err, std = _consoles()
    bench_rows = run_bench(cfg, console=err, out_console=std).rows
    rows = {r["method"]: r for r in bench_rows}
    assert list(rows) == ["plain", "ngram@6", "plain~inexact", "ngram@6~inexact"]
    assert rows["ngram@6"]["greedy_mismatches"] == 0  # exact: speculative == plain
    assert all(r["new_tokens"] == 24 and r["tokens_per_s"] > 0 for r in bench_rows)
    assert rows["ngram@6~inexact"]["rounds"] < 24  # drafts were verified on the inexact target too


def test_sampling_bench_reports_no_greedy_mismatch(tiny, cache):
    cfg = BenchConfig(datasets=["gsm8k"], model=tiny, dtype="fp32", methods=["plain", "hf", "ngram-chain@8"],
                      limit=1, max_new_tokens=12, repeats=1, temperature=0.8, progress=False)
    err, std = _consoles()
    res = run_bench(cfg, console=err, out_console=std)
    assert [r["method"] for r in res.rows] == ["plain", "hf", "ngram-chain@8"]
    assert all(r["greedy_mismatches"] is None and r["temperature"] == 0.8 for r in res.rows)
    assert "n/a" in std.file.getvalue()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_draft_model_and_hf_assisted_share_the_assistant(tiny, cache, tmp_path):
    """--assistant feeds both hf-assisted and paratree's draft-model drafter: same draft, same run."""
    cfg = BenchConfig(datasets=["gsm8k"], model=tiny, dtype="fp32", quick=True, assistant=tiny,
                      methods=["plain", "hf-assisted", "draft-model@8"], progress=False,
                      json_out=str(tmp_path / "rows.json"))
    err, std = _consoles()
    res = run_bench(cfg, console=err, out_console=std)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"plain", "hf-assisted", "draft-model@8"}, res.notes
    dm = rows["draft-model@8"]
    # The draft is the target itself: every chain it drafts is accepted whole. (Its chains are short:
    # a random tiny model is unsure, and the draft-model stops at the first token below 0.4.)
    assert dm["greedy_mismatches"] == 0 and dm["tau"] >= 2.0 and dm["accept_by_depth"][0] > 0.9
    assert rows["hf-assisted"]["greedy_mismatches"] == 0


def test_auto_sizer_calibrates_draft_probabilities():
    """A head whose probabilities understate acceptance: raw exp(cum_logp) keeps a small tree;
    once verify outcomes show the top chain is always taken, the calibrated sizer keeps it deeper.
    And the reverse: a drafter that is never right is pruned to the root."""
    from paratree.engine.sizing import AutoSizer, ProbCalibration, conditional_logp
    from paratree.tree.builders import build_best_first

    flat_rows = torch.full((8, 50), -4.0)
    flat_rows[:, :4] = torch.tensor([-0.3, -1.8, -2.3, -2.6])  # top child p ~ 0.27 after log_softmax
    t = build_best_first(3, flat_rows, budget=40, max_depth=8, width=4, keep_q=False)
    cond = conditional_logp(t)
    assert cond[0] == 0 and torch.allclose(cond[1:].exp(), cond[1:].exp().clamp(max=1))
    cost = VerifyCostModel([(1, 10e-3), (4, 11e-3), (8, 13e-3), (16, 17e-3), (40, 30e-3)])
    sizer = AutoSizer(cost, max_nodes=40)
    before = sizer(t)
    chain, node, kids = [0], 0, t.children()
    while kids[node]:
        node = kids[node][0]
        chain.append(node)
    for _ in range(100):
        sizer(t)
        sizer.observe(t, chain, [int(t.tokens[c]) for c in chain[1:]] + [7])
    after = sizer(t)
    assert int(after.depths.max()) > int(before.depths.max())
    est = sizer.node_accept_prob(t)
    assert est[chain[1]] > 0.9 and est[chain[3]] > 0.7  # the taken chain is learnt as near-certain
    assert est[kids[0][1]] < 0.1  # a sibling that was tested every round and never taken

    never = AutoSizer(cost, max_nodes=40)
    for _ in range(100):
        never(t)
        never.observe(t, [0], [7])  # the target's token is never among the root's children
    assert never(t).num_nodes == 1

    # calibration cells move from the drafter's own probability towards the observed rate
    cal = ProbCalibration(prior_weight=4.0)
    lp, d = torch.tensor([-1.0]), torch.tensor([2])
    assert abs(float(cal(lp, d)) - math.exp(-1.0)) < 1e-12
    cal.observe(lp.repeat(96), d.repeat(96), torch.ones(96))
    assert float(cal(lp, d)) > 0.97 and float(cal(lp, torch.tensor([1]))) < 0.4


def test_methods_are_interleaved_prompt_by_prompt(tiny, cache, monkeypatch):
    """Every prompt is decoded by every method before the next prompt (order rotating), so a slow
    spell of the machine hits all methods alike."""
    from paratree.bench import suite

    order = []
    real = suite.Bench.run_paratree

    def spy(self, gen, ids, i, counter, max_new=None):
        if max_new is None:  # not a warm-up
            order.append((i, gen.drafter.name, gen.budget))
        return real(self, gen, ids, i, counter, max_new=max_new)

    monkeypatch.setattr(suite.Bench, "run_paratree", spy)
    cfg = BenchConfig(datasets=["gsm8k"], model=tiny, dtype="fp32", methods=["plain", "ngram@4", "ngram@8"],
                      limit=3, max_new_tokens=6, repeats=1, progress=False)
    err, std = _consoles()
    res = run_bench(cfg, console=err, out_console=std)
    assert [i for i, *_ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    firsts = [order[3 * i][1:] for i in range(3)]
    assert len(set(firsts)) == 3  # the method that goes first rotates
    assert [r["method"] for r in res.rows] == ["plain", "ngram@4", "ngram@8"]
    assert all(r["n_prompts"] == 3 for r in res.rows)


def test_payoff_gate_follows_the_faster_measured_rate_and_keeps_probing():
    from paratree.engine.sizing import PayoffGate

    g = PayoffGate(probe_every=8)
    choices = []
    for _ in range(200):
        d = g.draft_now()
        choices.append(d)
        g.observe(d, 3 if d else 1, 0.1 if d else 0.05)  # drafting: 30 tok/s, plain: 20 tok/s
    assert sum(choices[100:]) >= 85 and not all(choices[100:])  # drafts, with a plain probe now and then
    g = PayoffGate(probe_every=8)
    choices = []
    for _ in range(400):
        d = g.draft_now()
        choices.append(d)
        g.observe(d, 1 if d else 1, 0.2 if d else 0.05)  # drafting never pays: 4x the time, a quarter the rate
    late = choices[100:]
    assert 0 < sum(late) <= 300 // (8 * 4) + 1  # plain; drafted probes rarer than every 8th round, not never


def test_auto_sizer_stops_drafting_when_drafts_do_not_pay(tiny, cache):
    """A drafter whose pass costs more than its drafts earn is switched off by --budget auto,
    except for probes, and the output is still plain decoding's."""
    import time

    from paratree.drafters import NGramDrafter, NoDrafter
    from paratree.engine.generate import Generator
    from paratree.engine.sizing import AutoSizer
    from paratree.models.loader import load_model
    from paratree.models.runner import TargetRunner

    class SlowDrafter(NGramDrafter):
        calls = 0

        def propose(self, tokens, budget):
            SlowDrafter.calls += 1
            time.sleep(0.02)  # a draft pass far dearer than the tiny target's verify
            return super().propose(tokens, budget)

    lm = load_model(tiny, "fp32")
    ids = list(range(5, 25))
    runner = TargetRunner(lm.model, max_len=400)
    plain = Generator(runner, NoDrafter()).generate(ids, 160)
    sizer = AutoSizer(VerifyCostModel([(1, 1e-3), (64, 2e-3)]))
    res = Generator(runner, SlowDrafter(), budget=16, sizer=sizer).generate(ids, 160)
    assert res.token_ids == plain.token_ids
    assert sizer.gate.skipped > res.rounds / 2 and SlowDrafter.calls == res.rounds - sizer.gate.skipped
    assert sizer.gate.rate("plain") > sizer.gate.rate("draft")


def test_llama_methods_parse_and_refuse_budgets_and_dense_models():
    from paratree.bench.llama_peer import LlamaPeer, LlamaPeerError

    specs, _ = expand_methods(["llama.cpp", "llama.cpp-lookup", "ngram@4"], [8])
    assert [(s.label, s.kind) for s in specs] == [("plain", "paratree"), ("llama.cpp", "llama.cpp"),
                                                 ("llama.cpp-lookup", "llama.cpp"), ("ngram@4", "paratree")]
    with pytest.raises(ValueError, match="take no @budget"):
        expand_methods(["llama.cpp@8"], [8])
    with pytest.raises(LlamaPeerError, match="GGUF models only"):
        LlamaPeer(None, 512, 1)


@pytest.mark.slow
def test_llama_cpp_peer_runs_the_same_gguf_in_the_bench_process(tmp_path):
    """Exercised where llama-cpp-python is installed (scripts/build_llama_cpp.sh): both peers decode
    the default model's GGUF on the bench's prompts, greedy, and report tokens/s without a forward count."""
    from paratree.bench.llama_peer import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (bash scripts/build_llama_cpp.sh)")
    cfg = BenchConfig(datasets=["gsm8k"], methods=["plain", "llama.cpp", "llama.cpp-lookup"], limit=2,
                      max_new_tokens=16, repeats=1, dtype="gguf", progress=False, json_out=str(tmp_path / "b.json"))
    rows = {r["method"]: r for r in run_bench(cfg).rows}
    assert set(rows) == {"plain", "llama.cpp", "llama.cpp-lookup"}
    for m in ("llama.cpp", "llama.cpp-lookup"):
        r = rows[m]
        assert r["kind"] == "llama.cpp" and r["tokens_per_forward"] is None and r["tau"] is None
        assert 2 <= r["new_tokens"] <= 32 and r["tokens_per_s"] > 0 and r["greedy_mismatches"] is not None
    assert len(json.loads((tmp_path / "b.json").read_text())) == 3


def test_auto_sizer_asks_for_about_what_it_keeps(tiny, cache):
    """The drafter is asked for 2x the largest tree kept lately (at least 8 nodes), not the curve's
    256: a best-first drafter's small tree is the top of its large one, and drafting 129 nodes to
    keep 5 cost more than the verify saved. What is verified is still a prefix of what was drafted."""
    from paratree.drafters import NGramDrafter, NoDrafter
    from paratree.engine.generate import Generator
    from paratree.engine.sizing import AutoSizer
    from paratree.models.loader import load_model
    from paratree.models.runner import TargetRunner

    sizer = AutoSizer(VerifyCostModel([(1, 1e-3), (8, 1.2e-3), (256, 0.2)]))
    assert sizer.propose_budget(256) == 32 and sizer.propose_budget(12) == 12  # nothing kept yet
    sizer.kept_nodes += [3, 5, 2]
    assert sizer.propose_budget(256) == 10 and sizer.propose_budget(6) == 6
    sizer.kept_nodes += [1] * 8  # the last 8 rounds kept roots only
    assert sizer.propose_budget(256) == 8

    class Recording(NGramDrafter):
        asked: list[int] = []

        def propose(self, tokens, budget):
            Recording.asked.append(budget)
            return super().propose(tokens, budget)

    lm = load_model(tiny, "fp32")
    ids = [5, 6, 7, 8] * 6
    runner = TargetRunner(lm.model, max_len=400)
    plain = Generator(runner, NoDrafter()).generate(ids, 64)
    sizer = AutoSizer(VerifyCostModel([(1, 1e-3), (8, 1.2e-3), (256, 0.2)]))
    sizer.gate = None  # every round drafts
    res = Generator(runner, Recording(), budget=256, sizer=sizer).generate(ids, 64)
    assert res.token_ids == plain.token_ids
    assert Recording.asked[0] == 32 and max(Recording.asked[1:]) <= max(8, 2 * max(sizer.kept_nodes))


# -- llama.cpp running an exported head (bench/llama_spec.py) -------------------------------------
LLAMA_SPEC_LOG = """0.03.931.243 I encoded   16 tokens in    0.065 seconds, speed:  247.196 t/s
0.03.931.243 I decoded   65 tokens in    3.394 seconds, speed:   19.151 t/s
0.03.931.249 I
0.03.931.255 I n_draft   = 7
0.03.931.261 I n_predict = 65
0.03.931.267 I n_drafted = 140
0.03.931.272 I n_accept  = 41
0.03.931.278 I accept    = 29.286%
"""


def test_llama_spec_statistics_give_exact_rounds():
    """Every round of llama-speculative-simple adds accepted + 1 tokens: rounds = n_predict - n_accept."""
    from paratree.bench.llama_spec import parse_run

    s = parse_run(LLAMA_SPEC_LOG)
    assert (s["n_predict"], s["n_drafted"], s["n_accept"], s["rounds"]) == (65, 140, 41, 24)
    assert s["seconds"] == pytest.approx(0.065 + 3.394)


def test_llama_spec_methods_take_a_fixed_draft_length_and_fail_in_one_line(monkeypatch, tmp_path):
    from paratree.bench.llama_peer import LlamaPeerError
    from paratree.bench.llama_spec import draft_gguf, llama_tree, parse_run

    specs, _ = expand_methods(["llama.cpp-dflash@8", "dflash@8"], [8])
    assert [(s.label, s.kind, s.drafter, s.budget) for s in specs][1] == ("llama.cpp-dflash@8", "llama.cpp",
                                                                          "llama.cpp-dflash", 8)
    with pytest.raises(ValueError, match="fixed length"):
        expand_methods(["llama.cpp-eagle3@auto"], [8])
    monkeypatch.setenv("PARATREE_LLAMA_CPP", str(tmp_path))  # no build there
    with pytest.raises(LlamaPeerError, match="build_llama_spec.sh"):
        llama_tree()
    with pytest.raises(LlamaPeerError, match="not an exported head"):
        draft_gguf(tmp_path, tmp_path, tmp_path)
    with pytest.raises(LlamaPeerError, match="printed no n_predict"):
        parse_run("error: failed to load model\n")
