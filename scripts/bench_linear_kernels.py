"""Linear-kernel A/B (docs/benchmarks.md, "MKL-packed fp32"): SmolLM2-135M in fp32 with oneDNN-packed vs
MKL-bucketed linears, both loaded in one process. Prints the verify cost curve (interleaved, median of 9)
and greedy generation tok/s on 6 GSM8K prompts x 128 tokens (prompts interleaved between the layouts).

    .venv/bin/python scripts/bench_linear_kernels.py
"""
import time, json, statistics, torch
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.models.transformer import PackedLinear, _swap_linears
from paratree.tree.draft_tree import DraftTree
from paratree.engine.costs import random_best_first_tree
from paratree.engine.generate import Generator
from paratree.engine.pipeline import encode_prompt
from paratree.drafters import make_drafter
from paratree.data import load_prompts

new = load_model(None, "fp32", pack=True)
old = load_model(None, "fp32", pack=False)
assert _swap_linears(old.model.layers, True, ())  # session 4's layout: plain + oneDNN, no MKL buckets
old.model.lm_head_packed = PackedLinear(old.model.lm_head, True, ())
models = {"onednn": old, "mkl": new}
V = new.config.vocab_size
g = torch.Generator().manual_seed(0)
sizes = (1, 2, 4, 8, 16, 24, 32, 64)
trees = {n: (DraftTree.chain([5]) if n == 1 else random_best_first_tree(5, n, V, g)) for n in sizes}
runners = {}
for k, lm in models.items():
    r = TargetRunner(lm.model, max_len=1024); r.prefill(list(range(100, 356))); runners[k] = r
def once(r, t):
    t0 = time.perf_counter(); r.verify(t); dt = time.perf_counter() - t0; r.commit([0]); r.lengths[0] -= 1
    return dt
curve = {k: {} for k in models}
for n in sizes:
    for k in models: once(runners[k], trees[n])
    ts = {k: [] for k in models}
    for _ in range(9):
        for k in models: ts[k].append(once(runners[k], trees[n]))
    for k in models: curve[k][n] = round(1e3 * statistics.median(ts[k]), 1)
print("verify ms", json.dumps(curve))
del runners
prompts = [encode_prompt(new.tokenizer, p) for p in load_prompts("gsm8k", 6)]
methods = [("plain", 1), ("ngram", 8), ("ngram", 16), ("jetspec", 8), ("jetspec", 16)]
gens = {}
for k, lm in models.items():
    for name, b in methods:
        gens[(k, name, b)] = Generator(TargetRunner(lm.model, max_len=1024), make_drafter(name, lm), eos_ids={lm.tokenizer.eos_token_id}, budget=b)
res = {key: [0, 0.0, 0] for key in gens}
outs = {}
for i, p in enumerate(prompts):
    for name, b in methods:
        for k in (("onednn", "mkl") if i % 2 == 0 else ("mkl", "onednn")):
            r = gens[(k, name, b)].generate(p, 128)
            acc = res[(k, name, b)]; acc[0] += r.num_new_tokens; acc[1] += r.time_total; acc[2] += r.rounds
            outs.setdefault((name, b, i), []).append(r.token_ids)
same = sum(len(set(map(tuple, v))) == 1 for v in outs.values())
print(f"identical outputs across kernels: {same}/{len(outs)}")
for name, b in methods:
    row = []
    for k in models:
        t, s, rounds = res[(k, name, b)]
        row.append(f"{k} {t / s:5.1f} tok/s tau {t / rounds:.2f}")
    ratio = (res[("mkl", name, b)][0] / res[("mkl", name, b)][1]) / (res[("onednn", name, b)][0] / res[("onednn", name, b)][1])
    print(f"{name}@{b}: " + " | ".join(row) + f" | mkl/onednn {ratio:.2f}x")
