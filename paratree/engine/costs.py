"""Every latency curve paratree sizes drafts with, from one place: `CostService`.

Measured, never assumed: `calibrate` times verify latency T(n) for trees of 1..256 nodes
on top of a realistic KV-cache length, the draft latency of every drafter and the fixed
per-round overhead, and stores them as a JSON profile under the paratree cache dir (per
model, dtype, GEMM kernels and CPU). The server's batched curve (verify forwards of n nodes
spread over rows) is measured here too and stored per batch size. The engine builds one
`CostService` per loaded model and passes what it yields down: the `AutoSizer` of
`--budget auto`, the DSpark drafter's curve, the server's policy. Drafters never fetch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data import load_prompts
from ..drafters import drafter_names, make_drafter
from ..models.kernels import cpu_signature, median_seconds
from ..models.loader import PACKAGED, LoadedModel, cache_dir, dtype_name
from ..models.runner import TargetRunner
from ..models.transformer import linear_kernels
from ..tree.builders import build_best_first
from ..tree.cost import VerifyCostModel
from ..tree.draft_tree import DraftTree
from ..verify.accept import accept
from ..verify.warp import SamplingParams
from .sizing import AutoSizer, profile_cost

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
QUICK_SIZES = (1, 4, 16, 64, 256)
PROFILE_VERSION = 2  # 2: profiles keyed by GEMM kernels, bucket edges measured


# -- profile location ------------------------------------------------------------------
def model_key(lm: LoadedModel) -> str:
    """The model's display name, plus a path hash for checkpoint directories (names like 'model' collide)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", lm.name)
    if lm.name in PACKAGED:
        return name
    return f"{name}-{hashlib.sha1(str(Path(lm.path).resolve()).encode()).hexdigest()[:8]}"


def profile_path(lm: LoadedModel, dtype: str | torch.dtype | None = None) -> Path:
    dt = dtype_name(dtype if dtype is not None else lm.model.embed.weight.dtype)
    kernels, _ = linear_kernels(lm.model)  # e.g. 'onednn', 'stock2-mkl4.8.16.32.64-stock': the curve's shape
    return cache_dir() / "profiles" / f"{model_key(lm)}-{dt}-{kernels}-{cpu_signature()}.json"


def calibration_sizes(lm: LoadedModel, base: Sequence[int]) -> list[int]:
    """`base` plus both sides of every row-bucket edge of the model's GEMM kernels, so a
    staircase-shaped cost curve is measured at its steps (interpolation would smooth them)."""
    _, buckets = linear_kernels(lm.model)
    return sorted(set(base) | {m for b in buckets for m in (b, b + 1)})


# -- calibration -----------------------------------------------------------------------
def random_best_first_tree(root: int, n: int, vocab: int, gen: torch.Generator, depth: int = 12,
                           width: int = 6) -> DraftTree:
    """A tree of exactly n nodes with the shape a best-first drafter produces (random peaked rows)."""
    if n <= 1:
        return DraftTree.chain([root])
    logits = torch.randn(depth, vocab, generator=gen, dtype=torch.float64) * 4.0
    tree = build_best_first(root, logits, budget=n, max_depth=depth, width=width, keep_q=False)
    while tree.num_nodes < n:  # cannot happen for n <= 256 with these parameters, but stay exact
        width += 2
        tree = build_best_first(root, logits, budget=n, max_depth=depth, width=width, keep_q=False)
    return tree


def time_round_robin(calls: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each call, `repeats` times: one untimed sweep over all calls first (a first forward
    of a new shape pays one-off kernel set-up), then timed sweeps, round-robin, so a burst of load
    from other processes hits every call alike instead of bending one part of a curve."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for k, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return times


def measure_verify(runner: TargetRunner, sizes: Sequence[int], past_len: int = 256, repeats: int = 5,
                   seed: int = 0, on_point: Callable[[int, float], None] | None = None) -> list[tuple[int, float]]:
    """Median latency of `runner.verify` on random best-first trees of each size, after `past_len`
    cached tokens (timed round-robin, `time_round_robin`); verify without commit keeps the cache at
    `past_len` (the same slots are reused)."""
    vocab = runner.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    past_len = max(1, min(past_len, runner.max_len - max(sizes) - 1))
    runner.reset()
    runner.prefill(torch.randint(0, vocab, (past_len,), generator=gen).tolist())
    trees = [random_best_first_tree(int(torch.randint(0, vocab, (1,), generator=gen)), n, vocab, gen) for n in sizes]
    times = time_round_robin([lambda tree=tree: runner.verify(tree) for tree in trees], repeats)
    points = [(int(n), statistics.median(ts)) for n, ts in zip(sizes, times)]
    if on_point is not None:
        for n, s in points:
            on_point(n, s)
    runner.reset()
    return points


def _context_ids(lm: LoadedModel, n: int = 256) -> list[int]:
    """Real text token ids for timing drafters (GSM8K questions), padded/cut to n."""
    text = "\n".join(load_prompts("gsm8k", limit=12))
    ids = lm.tokenizer.encode(text) if lm.tokenizer is not None else []
    if not ids:
        ids = list(range(1, 64))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_drafters(lm: LoadedModel, names: Sequence[str] | None = None, budget: int = 32, repeats: int = 5,
                     ctx_len: int = 256, max_budget: int | None = None) -> dict[str, dict]:
    """Median `propose` latency per drafter at `budget` (what `--budget auto` charges a round) and at `max_budget`.

    Errors are recorded, never raised: a trained head may be missing on this machine.
    """
    ids = _context_ids(lm, ctx_len)
    out: dict[str, dict] = {}
    for name in names if names is not None else drafter_names():
        try:
            d = make_drafter(name, lm)
            taps = None
            if getattr(d, "tap_layers", ()):
                runner = TargetRunner(lm.model, max_len=ctx_len + budget + 8)
                taps = runner.prefill(ids[:-1], taps=d.tap_layers)
            d.begin(list(ids), taps)
            s = median_seconds(lambda: d.propose(list(ids), budget), repeats)
            out[name] = {"seconds": s, "budget": budget}
            if max_budget and max_budget != budget:
                out[name]["seconds_max"] = median_seconds(lambda: d.propose(list(ids), max_budget), repeats)
                out[name]["budget_max"] = max_budget
        except Exception as e:  # a drafter that cannot run here is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def measure_round_overhead(lm: LoadedModel, runner: TargetRunner, repeats: int = 21) -> float:
    """Per-round work besides draft and verify forward: acceptance over the verified logits (median)."""
    runner.reset()
    runner.prefill(list(range(1, 17)))
    tree = DraftTree.chain([1])
    logits = runner.verify(tree).logits
    params = SamplingParams()
    s = median_seconds(lambda: accept(tree, logits, params, None), repeats)
    runner.reset()
    return s


def calibrate(lm: LoadedModel, sizes: Sequence[int] | None = None, max_nodes: int = 256, past_len: int = 256,
              repeats: int = 5, drafters: Sequence[str] | None = None, path: Path | None = None,
              on_point: Callable[[int, float], None] | None = None) -> dict:
    """Measure this machine's verify cost curve and drafter latencies; write and return the profile."""
    sizes = sorted({int(s) for s in calibration_sizes(lm, sizes or CALIBRATION_SIZES) if 1 <= int(s) <= max_nodes}
                   | {1})
    runner = TargetRunner(lm.model, max_len=min(lm.config.max_position, past_len + max(sizes) + 64))
    t_start = time.perf_counter()
    points = measure_verify(runner, sizes, past_len=past_len, repeats=repeats, on_point=on_point)
    overhead = measure_round_overhead(lm, runner)
    draft = measure_drafters(lm, drafters, repeats=repeats, max_budget=max(sizes))
    cost = VerifyCostModel(points)
    kernel_kind, buckets = linear_kernels(lm.model)
    profile = {
        "version": PROFILE_VERSION,
        "model": lm.name,
        "model_path": str(lm.path),
        "dtype": dtype_name(lm.model.embed.weight.dtype),
        "host": socket.gethostname(),
        "cpu": cpu_signature(),
        "torch_threads": torch.get_num_threads(),
        "linear_kernels": [kernel_kind, list(buckets)],
        "past_len": past_len,
        "repeats": repeats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "calibration_seconds": round(time.perf_counter() - t_start, 3),
        "verify_points": [[n, s] for n, s in points],  # measured medians
        "verify_model": [[n, s] for n, s in cost.points],  # monotone (running max) as VerifyCostModel keeps them
        "round_overhead_s": overhead,
        "draft": draft,
    }
    return store_profile(profile, Path(path) if path is not None else profile_path(lm))


def store_profile(profile: dict, path: Path) -> dict:
    """Write `profile` to `path` atomically (a killed run leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({k: v for k, v in profile.items() if k != "path"}, indent=1))
    tmp.replace(path)
    profile["path"] = str(path)
    return profile


def load_profile(path: Path) -> dict | None:
    try:
        prof = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if prof.get("version") != PROFILE_VERSION or not prof.get("verify_points"):
        return None
    prof["path"] = str(path)
    return prof


def get_profile(lm: LoadedModel, calibrate_if_missing: bool = True, quick: bool = True, **kw) -> dict | None:
    """The stored profile for this model, dtype and machine; a short calibration runs when it is missing."""
    path = profile_path(lm)
    prof = load_profile(path)
    if prof is None and calibrate_if_missing:
        if quick:
            kw.setdefault("sizes", QUICK_SIZES)
            kw.setdefault("repeats", 3)
        prof = calibrate(lm, path=path, **kw)
    return prof


# -- the batched curve of the server -------------------------------------------------------
def measure_verify_cost(runner: TargetRunner, sizes=(1, 4, 16, 64, 256), repeats: int = 2) -> VerifyCostModel:
    """Quick T(total verify nodes) curve of batched forwards on this machine.

    n nodes are spread over min(n, batch_size) rows as chains, timed round-robin
    (`time_round_robin`); the fastest time per size is kept.
    """
    rows = list(range(runner.batch_size))
    saved = list(runner.lengths)

    def run(n: int) -> None:
        r = min(n, len(rows))
        per = [n // r + (1 if i < n % r else 0) for i in range(r)]
        runner.verify_batch([DraftTree.chain([1] * k) for k in per], rows[:r])
        for i in rows[:r]:
            runner.discard(i)

    try:
        times = time_round_robin([lambda n=n: run(n) for n in sizes], max(1, repeats))
        return VerifyCostModel([(n, min(ts)) for n, ts in zip(sizes, times)])
    finally:
        for i, n in enumerate(saved):
            runner.truncate(n, i)


def cost_model_key(ckpt: str, dtype: torch.dtype | str, max_batch: int) -> str:
    raw = f"{ckpt}|{dtype}|{torch.get_num_threads()}|{max_batch}|{platform.machine()}|{platform.node()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_or_measure_cost(runner: TargetRunner, path, sizes=(1, 4, 16, 64, 256), repeats: int = 2
                         ) -> tuple[VerifyCostModel, bool]:
    """(cost model, measured_now): read `path` if it holds one, else measure and store it there."""
    p = Path(path) if path else None
    if p is not None and p.is_file():
        try:
            return VerifyCostModel.from_json(p.read_text()), False
        except (ValueError, KeyError, TypeError):
            pass
    cost = measure_verify_cost(runner, sizes, repeats)
    if p is not None:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(cost.to_json())
            tmp.replace(p)
        except OSError:
            pass
    return cost, True


# -- the service ----------------------------------------------------------------------------
class CostService:
    """The cost curves of one loaded model on this machine, found once and handed down.

    `profile()` is the stored calibration profile (a short calibration runs when there is none
    and `calibrate_if_missing`; `on_calibrate` is told first, so a CLI can say why it waits).
    """

    def __init__(self, lm: LoadedModel, calibrate_if_missing: bool = True,
                 on_calibrate: Callable[[], None] | None = None):
        self.lm = lm
        self.calibrate_if_missing = calibrate_if_missing
        self.on_calibrate = on_calibrate
        self._profile: dict | None = None

    @property
    def profile_path(self) -> Path:
        return profile_path(self.lm)

    def stored_profile(self) -> dict | None:
        """The profile on disk, if any (never calibrates)."""
        if self._profile is None:
            self._profile = load_profile(self.profile_path)
        return self._profile

    def profile(self, drafters: Sequence[str] | None = None) -> dict:
        """The stored profile; a missing one is calibrated now, timing only `drafters` (None: all)."""
        prof = self.stored_profile()
        if prof is None:
            if not self.calibrate_if_missing:
                raise ValueError(f"no calibration profile at {self.profile_path}: run `paratree calibrate`")
            if self.on_calibrate is not None:
                self.on_calibrate()
            prof = self._profile = get_profile(self.lm, calibrate_if_missing=True, drafters=drafters)
        return prof

    def verify_curve(self) -> VerifyCostModel | None:
        """The single-sequence curve T(n) when this machine is calibrated, else None."""
        prof = self.stored_profile()
        return profile_cost(prof) if prof is not None else None

    def auto_sizer(self, drafter: str) -> AutoSizer:
        """`--budget auto` for `drafter`: the profile's curve plus its draft and round overhead. A first
        run calibrates the curve and this drafter only (a few seconds, not every drafter's latency); a
        drafter the profile has not timed yet is timed now and added to it."""
        prof = self.profile(drafters=[drafter])
        if drafter not in prof.get("draft", {}):
            top = max(int(n) for n, _ in prof["verify_points"])
            prof.setdefault("draft", {}).update(measure_drafters(self.lm, [drafter], max_budget=top))
            store_profile(prof, Path(prof["path"]))
        return AutoSizer.from_profile(prof, drafter)

    def batched_curve(self, runner: TargetRunner, path: str | Path | None, budget: int, max_batch: int
                      ) -> tuple[VerifyCostModel, str]:
        """The server's curve T(nodes in one forward), first found of:
        1. the `path` file (measured and written there if it does not exist yet);
        2. the batched curve stored by an earlier start for this model/dtype/machine/batch size;
        3. the calibration profile of this model/dtype/machine (single-row trees, many sizes);
        4. a quick batched measurement now (6 sizes, 2 timed sweeps), stored for the next start."""
        lm = self.lm
        sizes = tuple(sorted({1, 4, 16, 64, min(128, budget * max_batch), min(256, budget * max_batch)}))
        if path is None:
            # keyed by the linear kernels too: a gguf model's int4 curve is not its bf16 twin's
            dtype = f"{next(lm.model.parameters()).dtype}-{linear_kernels(lm.model)[0]}"
            path = cache_dir() / "serve" / f"verify-cost-{cost_model_key(str(lm.path), dtype, max_batch)}.json"
            if not Path(path).is_file() and (curve := self.verify_curve()) is not None:
                return curve, f"calibration profile {self._profile['path']}"
        cost, measured = load_or_measure_cost(runner, path, sizes=sizes, repeats=2)
        return cost, f"{'measured now, stored in' if measured else 'loaded from'} {path}"
