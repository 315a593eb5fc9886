"""Compact, resumable storage of distilled sequences: a directory of safetensors shards.

Ten times the data as jsonl would be ~6 bytes a token; a shard keeps a flat token array (uint16
when the vocabulary fits, int32 otherwise) with offsets, ~2 bytes a token, and its rows' keys and
what they cost in the header metadata. Each shard is written to a temporary name and renamed, so a
killed run never leaves half a shard: it loses only rows not yet flushed, and resuming regenerates
exactly those (the keys already stored are skipped).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "paratree-distill/1"
_SHARD = re.compile(r"^shard-(\d{5,})\.safetensors$")


def is_shard_store(path: str | Path) -> bool:
    """A path not ending in .jsonl names a shard directory (existing or to be created)."""
    return Path(path).suffix != ".jsonl"


def _shards(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _SHARD.match(p.name)), key=lambda p: int(_SHARD.match(p.name)[1]))


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors' own error type: a shard cut short by a lost machine
        raise ValueError(f"distill shard '{path}' is unreadable ({e}): delete it and rerun `paratree data` "
                         f"with the same command to regenerate its rows") from None


def _checked_meta(f, path: Path) -> dict:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a paratree distill shard (format {meta.get('format')!r}, want {FORMAT})")
    return meta


def read_shard_meta(path: Path) -> dict:
    with _open(path) as f:
        return _checked_meta(f, path)


def read_rows(root: str | Path) -> list[dict]:
    """Every stored row, shard by shard: {'source', 'index', 'temperature', 'prompt_len', 'ids'}."""
    out = []
    for p in _shards(Path(root)):
        with _open(p) as f:  # one open a shard: its header and its arrays
            keys = json.loads(_checked_meta(f, p)["rows"])
            tokens, offsets, plen = f.get_tensor("tokens"), f.get_tensor("offsets"), f.get_tensor("prompt_len")
        if len(offsets) != len(keys) + 1 or len(plen) != len(keys) or offsets[-1] != len(tokens):
            raise ValueError(f"shard '{p}' is inconsistent: {len(keys)} rows, {len(offsets)} offsets, "
                             f"{len(tokens)} tokens")
        for k, (source, index, temp) in enumerate(keys):
            out.append({"source": source, "index": int(index), "temperature": float(temp),
                        "prompt_len": int(plen[k]), "ids": tokens[offsets[k]:offsets[k + 1]].tolist()})
    return out


def stored_keys(root: str | Path) -> set[tuple]:
    """(source, index, temperature) of every stored row, read from the headers only."""
    keys = set()
    for p in _shards(Path(root)):
        keys |= {(s, int(i), float(t)) for s, i, t in json.loads(read_shard_meta(p)["rows"])}
    return keys


def store_summary(root: str | Path) -> dict:
    """What a store holds and what it cost: rows, tokens, response tokens, generation seconds."""
    rows = tokens = response = 0
    seconds = 0.0
    shards = _shards(Path(root))
    for p in shards:
        m = read_shard_meta(p)
        rows += len(json.loads(m["rows"]))
        tokens += int(m["tokens"])
        response += int(m["response_tokens"])
        seconds += float(m["wall_s"])
    return {"shards": len(shards), "rows": rows, "tokens": tokens, "response_tokens": response,
            "generation_s": round(seconds, 3),
            "response_tok_per_s": round(response / seconds, 1) if seconds else None}


class ShardWriter:
    """Buffers rows and writes them `rows_per_shard` at a time as the next numbered shard.

    `meta` (strings) is stored in every shard's header: the model, dtype, machine and settings that
    made it. Each shard also records the wall seconds since the previous flush, so a store's cost is
    the sum over its shards even across kills and resumes.
    """

    # Settings that change the responses: a resumed store must keep them (rows are keyed by prompt only).
    SAME = ("model", "dtype", "max_new_tokens", "seed")

    def __init__(self, root: str | Path, vocab_size: int, meta: dict[str, str], rows_per_shard: int = 256):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"'{self.root}' is a file, not a directory of shards: give a new directory, or a "
                             f"path ending in .jsonl for one json line per sequence")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ValueError(f"another `paratree data` is writing to '{self.root}'") from None
        for stale in self.root.glob(".shard-*.tmp"):
            stale.unlink()  # a kill during a write: that shard's rows were never counted as stored
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self.meta = {k: str(v) for k, v in meta.items()}
        self.rows_per_shard = rows_per_shard
        shards = _shards(self.root)
        if shards:
            have = read_shard_meta(shards[-1])
            for k in self.SAME:
                if k in self.meta and k in have and have[k] != self.meta[k]:
                    self._lock.close()
                    raise ValueError(f"'{self.root}' was made with {k} {have[k]}; this run has {k} {self.meta[k]}: "
                                     f"use the same settings to resume it, or a new directory")
        self.next = int(_SHARD.match(shards[-1].name)[1]) + 1 if shards else 0
        self.pending: list[dict] = []
        self._seconds = 0.0

    def add(self, row: dict, seconds: float) -> None:
        """Queue one row; `seconds` is the wall time spent since the previous add."""
        self.pending.append(row)
        self._seconds += seconds
        if len(self.pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = self.pending
        lengths = np.array([len(r["ids"]) for r in rows], dtype=np.int64)
        tensors = {"tokens": np.concatenate([np.asarray(r["ids"], dtype=self.dtype) for r in rows]),
                   "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   "prompt_len": np.array([r["prompt_len"] for r in rows], dtype=np.int32)}
        meta = dict(self.meta, format=FORMAT,
                    rows=json.dumps([[r["source"], r["index"], r["temperature"]] for r in rows]),
                    tokens=str(int(lengths.sum())),
                    response_tokens=str(sum(len(r["ids"]) - r["prompt_len"] for r in rows)),
                    wall_s=f"{self._seconds:.6f}")
        name = f"shard-{self.next:05d}.safetensors"
        tmp = self.root / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # data to share, not a secret (the writer creates files owner-only)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it is named: a lost machine leaves no short shard
        os.replace(tmp, self.root / name)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        # Only now are the rows stored: an interrupt above leaves them pending for the final flush.
        self.pending, self._seconds = [], 0.0
        self.next += 1

    def close(self) -> None:
        """Store what is pending and let another writer in."""
        try:
            self.flush()
        finally:
            self._lock.close()
