"""Which CPU GEMM kernel serves an fp32 Linear of n rows, measured on the machine it runs on.

Why: the fastest kernel per row count differs between CPUs, and the difference is large.
On the Intel AVX-512 VM the stock GEMV won for 1-2 rows and MKL's packed sgemm for 3-64
(docs/benchmarks.md, session 6); on the AMD AVX2 VM of session 8, oneDNN's packed layout
won at every row count (30 SmolLM2 layers, ms: 1 row 31.0 stock / 22.0 oneDNN / 31.1 MKL,
8 rows 45.4 / 31.1 / 58.5), and MKL's packed kernel was the slowest. A speculative decoder
lives on these numbers: they set both the plain step and the slope of the verify cost curve.
So the route is timed once per CPU, thread count and model shape, and cached.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Row counts MKL's packed sgemm is packed for. MKL packs B for one M: its kernel runs only
# when the input has exactly that many rows, so inputs are zero-padded up to the next bucket.
# Listed in the order they are kept when memory is short (16 and 64 first: together they cover
# every tree up to 64 nodes).
MKL_BUCKETS = (16, 64, 8, 32, 4)
# Row counts at which kernels are timed; a row count between two points takes the next point's kernel.
ROUTE_POINTS = (1, 2, 3, 4, 8, 16, 32, 64, 128)
KERNELS = ("stock", "onednn", "mkl")
ENV = "PARATREE_FP32_KERNELS"  # auto (default: measure) | stock | onednn | mkl (stock 1-2 rows, MKL to 64)


@dataclass(frozen=True)
class KernelRoute:
    """fp32 kernel per row count: `steps` = ((max_rows, kernel), ...) ascending, `tail` beyond the last.

    `buckets` are the MKL row counts kept packed; "mkl" rows are zero-padded to the smallest
    bucket that holds them (a route only sends rows to "mkl" where such a bucket exists)."""

    steps: tuple[tuple[int, str], ...]
    tail: str
    buckets: tuple[int, ...] = ()

    def kernel(self, rows: int) -> str:
        for bound, k in self.steps:
            if rows <= bound:
                return k
        return self.tail

    @property
    def uses_onednn(self) -> bool:
        return self.tail == "onednn" or any(k == "onednn" for _, k in self.steps)

    @property
    def name(self) -> str:
        """Compact and file-name safe, e.g. 'onednn' or 'stock2-mkl4.8.16.32.64-stock' (profile keys)."""
        parts = []
        for i, (bound, k) in enumerate(self.steps):
            nxt = self.steps[i + 1][1] if i + 1 < len(self.steps) else self.tail
            if k != nxt:
                parts.append("mkl" + ".".join(map(str, self.buckets)) if k == "mkl" else f"{k}{bound}")
        parts.append(self.tail)
        return "-".join(parts)

    def to_json(self) -> dict:
        return {"steps": [list(s) for s in self.steps], "tail": self.tail, "buckets": list(self.buckets)}

    @classmethod
    def from_json(cls, d: dict) -> "KernelRoute":
        return cls(tuple((int(b), str(k)) for b, k in d["steps"]), str(d["tail"]), tuple(int(b) for b in d["buckets"]))

    @classmethod
    def fixed(cls, kind: str, fit: int = len(MKL_BUCKETS)) -> "KernelRoute":
        """The routes `PARATREE_FP32_KERNELS` names (and the fallbacks when nothing can be timed)."""
        if kind == "stock" or fit < 1:
            return cls((), "stock")
        if kind == "onednn":
            return cls((), "onednn")
        if kind == "mkl":
            buckets = tuple(sorted(MKL_BUCKETS[:fit]))
            return cls(((2, "stock"), (max(buckets), "mkl")), "stock", buckets)
        raise ValueError(f"{ENV}={kind!r}: use auto, stock, onednn or mkl")


def choose_route(times: dict[str, dict[int, float]], fit: int) -> KernelRoute:
    """The route with the least total time over ROUTE_POINTS, keeping at most `fit` packed copies.

    `times[k][r]`: seconds for kernel k at r rows ("stock" and "onednn" at every point, "mkl" at
    its buckets). A packed layout is one extra copy of the weights (oneDNN one, MKL one per
    bucket), so the layouts kept are chosen jointly: every subset of at most `fit` copies is scored."""
    options = [("onednn", None)] * ("onednn" in times) + [("mkl", b) for b in MKL_BUCKETS if b in times.get("mkl", {})]

    def best_at(r: int, kept) -> tuple[float, str]:
        cands = [(times["stock"][r], "stock")]
        if ("onednn", None) in kept:
            cands.append((times["onednn"][r], "onednn"))
        ok = sorted(b for k, b in kept if k == "mkl" and b >= r)
        if ok:
            cands.append((times["mkl"][ok[0]], "mkl"))
        return min(cands, key=lambda c: (c[0], c[1] != "stock"))  # ties: the kernel needing no copy

    best = None
    for n in range(0, min(fit, len(options)) + 1):
        for kept in itertools.combinations(options, n):
            total = sum(best_at(r, kept)[0] for r in ROUTE_POINTS)
            if best is None or total < best[0] * (1 - 1e-9):  # ties: fewer copies win (smaller n first)
                best = (total, kept)
    kept = best[1]
    picks = [best_at(r, kept)[1] for r in ROUTE_POINTS]
    steps = tuple((r, k) for r, k in zip(ROUTE_POINTS, picks))
    # merge runs of one kernel; the last point's kernel (never mkl: no bucket reaches 128) is the tail
    merged = tuple((r, k) for i, (r, k) in enumerate(steps[:-1]) if k != steps[i + 1][1])
    used = tuple(sorted(b for k, b in kept if k == "mkl" and "mkl" in picks))
    return KernelRoute(merged, picks[-1], used)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the largest CPU cache sysfs reports (0 where unknown)."""
    best = 0
    for f in root.glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best


def measure_kernel_times(shapes: Sequence[tuple[int, int]], min_bytes: int | None = None,
                         repeats: int = 5) -> dict[str, dict[int, float]]:
    """Time every kernel on random fp32 weights of `shapes` (one layer's Linears, (out, in)),
    replicated until they exceed `min_bytes` (default: 96 MB or 3x the last-level cache, whichever
    is larger) so the weights stream from memory as in decoding, not from cache."""
    if min_bytes is None:
        min_bytes = max(96 << 20, 3 * last_level_cache_bytes())
    per_layer = sum(o * i * 4 for o, i in shapes)
    copies = max(1, min(64, -(-min_bytes // max(1, per_layer))))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) * 0.02 for _ in range(copies) for o, i in shapes]
    xs = {i: torch.randn(max(ROUTE_POINTS), i, generator=g) for _, i in shapes}
    times: dict[str, dict[int, float]] = {"stock": {}, "onednn": {}, "mkl": {}}
    with torch.no_grad():
        for r in ROUTE_POINTS:
            times["stock"][r] = median_seconds(lambda: [F.linear(xs[w.shape[1]][:r], w) for w in ws], repeats)
        try:
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
            for r in ROUTE_POINTS:
                times["onednn"][r] = median_seconds(lambda: [
                    torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]][:r], p, None, "none", [], "")
                    for w, p in zip(ws, packed)], repeats)
            del packed
        except (RuntimeError, AttributeError):
            del times["onednn"]
        if torch.backends.mkl.is_available():
            for m in MKL_BUCKETS:
                try:
                    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in ws]
                    times["mkl"][m] = median_seconds(lambda: [
                        torch.ops.mkl._mkl_linear(xs[w.shape[1]][:m], p, w, None, m) for w, p in zip(ws, packed)],
                        repeats)
                    del packed
                except (RuntimeError, AttributeError):
                    break
    return times


def cpu_signature() -> str:
    """A short, file-name-safe description of the CPU and the thread count torch uses."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1]
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or socket.gethostname()
    name = re.sub(r"\(r\)|\(tm\)|cpu|@.*$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "cpu"
    return f"{name}-{torch.get_num_threads()}t"


def fp32_route(shapes: Sequence[tuple[int, int]], fit: int, cache: Path | None) -> KernelRoute:
    """The measured route for Linears of `shapes` on this CPU (cached under `cache`), or the one
    `PARATREE_FP32_KERNELS` forces. `fit`: how many extra packed copies memory allows."""
    kind = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if kind != "auto" or fit < 1:
        return KernelRoute.fixed(kind if kind != "auto" else "stock", fit)
    key = hashlib.sha1(json.dumps([sorted(set(map(tuple, shapes))), torch.__version__]).encode()).hexdigest()[:10]
    path = None if cache is None else cache / "kernels" / f"{cpu_signature()}-{key}.json"
    times = None
    if path is not None and path.is_file():
        try:
            times = {k: {int(r): float(s) for r, s in v.items()} for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            times = None
    if times is None:
        times = measure_kernel_times(sorted(set(map(tuple, shapes))))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(times))
                tmp.replace(path)
            except OSError:
                pass
    return choose_route(times, fit)
