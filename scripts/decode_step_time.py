"""Time one plain decode step of a model: B sequences, each with CTX cached tokens, one new token each.

The shape of every plain decoding step (`TargetRunner.step`) and every batched plain serving
round (`verify_batch` of one-node trees, then `commit_batch`). To compare two versions of the
code, run it under each (PYTHONPATH=checkout), alternating:
    python scripts/decode_step_time.py --batch 16 --ctx 1000 --dtype bf16
"""

import argparse
import statistics
import time

from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.tree.draft_tree import DraftTree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    lm = load_model(args.model, dtype=args.dtype, tokenizer=False)
    b, warmup = args.batch, 3
    runner = TargetRunner(lm.model, max_len=args.ctx + args.steps + warmup + 8, batch_size=b)
    seqs = list(range(b))
    for s in seqs:
        runner.prefill([(100 + s + i) % lm.config.vocab_size for i in range(args.ctx)], seq=s)
    roots = [DraftTree.chain([5]) for _ in seqs]
    times = []
    for i in range(args.steps + warmup):
        t = time.perf_counter()
        if b == 1:
            runner.step(5)
        else:
            runner.verify_batch(roots, seqs)
            runner.commit_batch([[0]] * b, seqs)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1000)
    print(f"{lm.name} ({args.dtype}) batch {b} x {args.ctx} cached tokens: "
          f"decode step median {statistics.median(times):.1f} ms over {args.steps}")


if __name__ == "__main__":
    main()
