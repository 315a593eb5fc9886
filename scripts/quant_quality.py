"""What running a GGUF's own 4-bit codes (`--dtype gguf`) changes against its fp32 de-quantisation.

For each prompt (GSM8K, HumanEval, MT-Bench), the fp32 de-quantised model decodes N tokens greedily.
Then every runtime under test
- decodes N tokens greedily itself: agreement = identical continuations, and the mean length of the
  common prefix;
- scores the fp32 continuation teacher-forced: mean per-token log-likelihood, against fp32's own.
bf16 de-quantised weights are measured the same way, as the yardstick of an accepted rounding.

Usage: python scripts/quant_quality.py [--model NAME] [--prompts 20] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from paratree.data import load_prompts
from paratree.engine.pipeline import encode_prompt
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner, greedy_tokens
from paratree.tree.draft_tree import DraftTree


def loglik(runner: TargetRunner, ids: list[int], cont: list[int]) -> list[float]:
    """Per-token log-probabilities of `cont` after `ids`, teacher-forced in one chain verify."""
    runner.reset()
    runner.prefill(ids[:-1])
    logits = runner.verify(DraftTree.chain([ids[-1], *cont[:-1]])).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(cont)), torch.tensor(cont)].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    per = {"gsm8k": a.prompts // 2, "humaneval": a.prompts // 4}
    per["mt_bench"] = a.prompts - sum(per.values())
    ref = load_model(a.model, "fp32")
    prompts = [encode_prompt(ref.tokenizer, p) for ds, k in per.items() for p in load_prompts(ds, k)]
    r_ref = TargetRunner(ref.model, max_len=max(map(len, prompts)) + a.tokens + 8)
    conts = [greedy_tokens(r_ref, ids, a.tokens) for ids in prompts]
    base = [statistics.fmean(loglik(r_ref, ids, c)) for ids, c in zip(prompts, conts)]
    print(f"model {ref.name}: {len(prompts)} prompts x {a.tokens} greedy tokens, reference fp32 de-quantised")
    print("| runtime | identical continuations | mean common prefix | mean log-lik / token | Δ vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 (reference) | {len(prompts)}/{len(prompts)} | {a.tokens:.1f} | {statistics.fmean(base):.4f} | 0 |")
    for dt in ("bf16", "gguf"):
        lm = load_model(a.model, dt)
        r = TargetRunner(lm.model, max_len=r_ref.max_len)
        same, prefix, ll = 0, [], []
        for ids, c in zip(prompts, conts):
            g = greedy_tokens(r, ids, a.tokens)
            same += g == c
            prefix.append(next((i for i, (x, y) in enumerate(zip(g, c)) if x != y), len(c)))
            ll.append(statistics.fmean(loglik(r, ids, c)))
        m = statistics.fmean(ll)
        print(f"| {dt} | {same}/{len(prompts)} | {statistics.fmean(prefix):.1f} | {m:.4f} | "
              f"{m - statistics.fmean(base):+.4f} |")


if __name__ == "__main__":
    main()
