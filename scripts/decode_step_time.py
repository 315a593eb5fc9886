"""Time one plain decode step of a model: B sequences, each with CTX cached tokens, one new token each.

The shape of every plain decoding step and every batched plain serving round. To compare two
versions of the code, run it under each (PYTHONPATH=checkout), alternating:
    python scripts/decode_step_time.py --batch 16 --ctx 1000 --dtype bf16
"""

import argparse
import statistics
import time

import torch

from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    lm = load_model(args.model, dtype=args.dtype, tokenizer=False)
    b = args.batch
    runner = TargetRunner(lm.model, max_len=args.ctx + 64, batch_size=b)
    for s in range(b):
        runner.prefill([(100 + s + i) % lm.config.vocab_size for i in range(args.ctx)], seq=s)
    lengths = torch.tensor(runner.lengths[:b])
    kv_len = int(lengths.max()) + 1
    mask = (torch.arange(kv_len).view(1, -1) <= lengths.view(-1, 1)).view(b, 1, 1, kv_len)
    times = []
    with torch.inference_mode():
        for i in range(args.steps + 3):  # 3 untimed warm-up steps
            t = time.perf_counter()
            lm.model(torch.full((b, 1), 5), lengths.view(b, 1), runner.k, runner.v, kv_len,
                     slots=lengths.view(b, 1), mask=mask)
            if i >= 3:
                times.append((time.perf_counter() - t) * 1000)
    print(f"{lm.name} ({args.dtype}) batch {b} x {args.ctx} cached tokens: "
          f"decode step median {statistics.median(times):.1f} ms over {args.steps}")


if __name__ == "__main__":
    main()
