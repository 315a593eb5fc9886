"""`paratree bench-plain`: the own runner vs HF `generate()` (and llama.cpp on the same GGUF, when
llama-cpp-python is installed), plain greedy decoding, one process.

Also reports the memory-bandwidth floor: one decode step must stream every
weight byte once, so weight bytes / measured bandwidth bounds tokens/s.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from ..engine.pipeline import Pipeline
from ..models.loader import load_model
from ..models.quant import source_gguf, streamed_weight_bytes
from .llama_peer import LlamaPeer, llama_cpp_available


def measure_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large memory copy (read + write counted)."""
    src = torch.empty(n_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def _hf_model(path, dtype):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def run_bench_plain(model: str | None, dtype: str, max_new_tokens: int, repeats: int, prompt: str,
                    compile: bool = False, exact: bool | None = None) -> dict:
    console = Console()
    lm = load_model(model, dtype, compile=compile, exact=exact)
    pipe = Pipeline(lm, drafter="plain")
    ids = pipe.encode(prompt)
    hf = _hf_model(lm.path, lm.model.embed.weight.dtype)
    x = torch.tensor([ids])
    rows = {"own": [], "hf": [], "llama.cpp": []}
    outs = {}
    gguf = source_gguf(lm.path)
    peer = LlamaPeer(gguf, len(ids) + max_new_tokens + 8, torch.get_num_threads()) \
        if gguf is not None and llama_cpp_available() else None
    for r in range(repeats + 1):  # first round is warm-up
        t = time.perf_counter()
        _, res = pipe.generate(ids, max_new_tokens)
        # Fixed length: the model may stop early at EOS, so count what was produced.
        own_s = time.perf_counter() - t
        n_own = res.num_new_tokens
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_own, min_new_tokens=n_own,
                              do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        hf_s = time.perf_counter() - t
        if peer is not None:  # the same GGUF in llama.cpp, same token count (no EOS stop)
            t = time.perf_counter()
            peer.generate("llama.cpp", ids, n_own, set(), 0.0, 0)
            if r:
                rows["llama.cpp"].append(n_own / (time.perf_counter() - t))
        if r:
            rows["own"].append(n_own / own_s)
            rows["hf"].append(n_own / hf_s)
        outs = {"own": res.token_ids, "hf": out[0, len(ids):].tolist()}
    bw = measure_bandwidth()
    weight_bytes = streamed_weight_bytes(lm.model)  # as stored: 4-bit codes + scales under --dtype gguf
    floor_tps = bw / weight_bytes
    own, hfm = statistics.median(rows["own"]), statistics.median(rows["hf"])
    table = Table(title=f"plain greedy decoding, {lm.name} ({dtype}), {len(outs['own'])} new tokens, median of {repeats}")
    for c in ("runner", "tokens/s", "vs HF", "of bandwidth floor"):
        table.add_column(c)
    table.add_row("paratree" + (" (--compile)" if compile else ""), f"{own:.1f}", f"{own / hfm:.2f}x", f"{own / floor_tps:.0%}")
    table.add_row("HF generate()" + (" (bf16 de-quantised)" if dtype == "gguf" else ""), f"{hfm:.1f}", "1.00x",
                  f"{hfm / floor_tps:.0%}")
    llama = statistics.median(rows["llama.cpp"]) if rows["llama.cpp"] else None
    if llama is not None:
        table.add_row("llama.cpp (same GGUF)", f"{llama:.1f}", f"{llama / hfm:.2f}x", f"{llama / floor_tps:.0%}")
    console.print(table)
    console.print(f"weights {weight_bytes / 1e6:.0f} MB, copy bandwidth {bw / 1e9:.1f} GB/s -> floor {floor_tps:.0f} tok/s; "
                  f"outputs identical: {outs['own'] == outs['hf']}")
    if llama is not None:
        console.print(f"paratree / llama.cpp: {own / llama:.2f}x")
    return {"compile": compile, "own_tps": own, "hf_tps": hfm, "llama_cpp_tps": llama, "speedup": own / hfm,
            "floor_tps": floor_tps,
            "identical": outs["own"] == outs["hf"]}
