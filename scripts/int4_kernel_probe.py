"""Time the linear kernels the GGUF runtime can use, on the default model's 120 decoder linear shapes.

torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32, bf16 activations) against oneDNN's
packed bf16 GEMM, per row count: the numbers behind `--dtype gguf` and its verify cost curve
(docs/benchmarks.md, session 13). Weights are random: only shapes and formats matter for time.

Usage: python scripts/int4_kernel_probe.py [--rows 1,2,4,8,16,32,64] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch

from paratree.models.kernels import median_seconds
from paratree.models.loader import checkpoint_dir, read_config


def shapes() -> list[tuple[int, int]]:
    cfg = read_config(checkpoint_dir(None)[1])
    h, kv, ffn = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = [(cfg.num_heads * cfg.head_dim + 2 * kv, h), (h, cfg.num_heads * cfg.head_dim), (2 * ffn, h), (h, ffn)]
    return per_layer * cfg.num_layers


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    sh = shapes()
    g = torch.Generator().manual_seed(0)
    int4 = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32), 2),
             torch.rand(k // 32, n, 2, generator=g).bfloat16()) for n, k in sh]
    bf16 = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=g).bfloat16(), 16) for n, k in sh]
    print(f"{len(sh)} linears, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| rows | int4 ms | bf16 oneDNN ms |\n|---:|---:|---:|")
    for m in (int(r) for r in a.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in {k for _, k in sh}}

        def run_int4():
            for (n, k), (w, sz) in zip(sh, int4):
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], w, 32, sz)

        def run_bf16():
            for (n, k), w in zip(sh, bf16):
                torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")

        print(f"| {m} | {median_ms(run_int4, a.repeats):.2f} | {median_ms(run_bf16, a.repeats):.2f} |")


if __name__ == "__main__":
    main()
