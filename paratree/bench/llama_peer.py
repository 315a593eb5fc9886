"""llama.cpp as a benchmark peer, in the bench's own process (`--methods llama.cpp,llama.cpp-lookup`).

Why: it is the engine CPU users already run on the very GGUF paratree loads, so it is the
baseline speculation has to beat. It runs through llama-cpp-python (an optional extra built
from source: `scripts/build_llama_cpp.sh`) on the same GGUF, the same chat-templated token
ids, the same thread count and the same max new tokens as every other method.
- `llama.cpp`: plain decoding.
- `llama.cpp-lookup`: llama-cpp-python's prompt-lookup drafter (`LlamaPromptLookupDecoding`).

Each generation starts from an empty KV cache (`reset()`), because llama-cpp-python would
otherwise reuse the cached prefix of a repeated prompt, which no other method gets. llama.cpp
does not expose its forward count, so tokens per forward is not reported for it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LLAMA_METHODS = ("llama.cpp", "llama.cpp-lookup")
# Draft length of the lookup peer: llama.cpp's own default (`--spec-draft-n-max` 3). With 10, as hf-pld
# uses, llama-cpp-python's lookup ran at 0.4x its plain decoding on 2 cores (docs/benchmarks.md).
LOOKUP_TOKENS = 3


class LlamaPeerError(RuntimeError):
    pass


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaPeer:
    """One llama.cpp context per method over one GGUF (the weights are mmapped, so they are shared)."""

    def __init__(self, gguf: Path | None, n_ctx: int, threads: int):
        if gguf is None:
            raise LlamaPeerError("llama.cpp runs GGUF models only; this model was loaded from a dense checkpoint")
        if not llama_cpp_available():
            raise LlamaPeerError("llama.cpp peer needs llama-cpp-python: run `bash scripts/build_llama_cpp.sh` "
                                 "(builds it from source, ~10 min on 2 cores)")
        self.gguf, self.n_ctx, self.threads = gguf, n_ctx, threads
        self._llms: dict[str, object] = {}

    def model(self, method: str):
        if method not in LLAMA_METHODS:
            raise ValueError(f"unknown llama.cpp method '{method}'")
        if method not in self._llms:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if method == "llama.cpp-lookup" else None
            self._llms[method] = Llama(model_path=str(self.gguf), n_ctx=self.n_ctx, n_threads=self.threads,
                                       n_threads_batch=self.threads, draft_model=draft, verbose=False)
        return self._llms[method]

    def generate(self, method: str, ids: list[int], max_new: int, eos_ids: set[int], temperature: float,
                 seed: int) -> list[int]:
        """New token ids, stopping after an EOS id or `max_new` tokens (greedy at temperature 0)."""
        llm = self.model(method)
        llm.reset()  # no prefix reuse across calls
        if temperature > 0:
            llm.set_seed(seed)
        out: list[int] = []
        for tok in llm.generate(ids, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if tok in eos_ids or len(out) >= max_new:
                break
        return out
