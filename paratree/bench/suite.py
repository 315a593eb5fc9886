"""`paratree bench`: every decoding method on the same prompts, in one process, same dtype.

Methods: `plain` (own runner, no drafter), `hf` (transformers `generate()` on the same
converted checkpoint), `hf-pld` (transformers prompt lookup), `hf-assisted` (transformers
assisted generation, only with `--assistant`), `llama.cpp` and `llama.cpp-lookup` (the same GGUF
through llama-cpp-python, `bench/llama_peer.py`; only when named), `llama.cpp-eagle3|dflash|dspark@N`
(an exported head in llama.cpp's own speculative decoding, `bench/llama_spec.py`; only when named, with
`--head FMT=DIR`), and every paratree drafter in
`paratree.drafters.drafters()` (the registry) at each tree budget (`name@budget` picks one budget; `auto`
sizes each tree against this machine's calibrated verify cost).

Timing: methods are interleaved. Each prompt is decoded by every method in turn (the
order rotates from prompt to prompt) before the next prompt starts, so a slow spell of a
shared machine hits all methods alike and the ratios stay honest. The whole prompt set runs
`repeats` times; the first repeat is a warm-up and is excluded when there are two or more.
tokens/s is the median over the measured repeats of (new tokens / wall seconds, prefill
included). Target forwards are counted with a forward pre-hook on the target module, for
paratree and HF alike (plus the calls of a `--compile` graph, which bypass hooks).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from ..data import load_prompts
from ..drafters import drafters, head_family, make_drafter
from ..drafters.families.draft_model import draft_lm
from ..engine.costs import CostService
from ..engine.generate import Generator
from ..engine.pipeline import encode_prompt
from ..engine.sizing import parse_budget
from ..models.kernels import cpu_signature
from ..models.loader import LoadedModel, dtype_name, hf_twin, load_model
from ..models.quant import source_gguf
from ..models.runner import TargetRunner
from ..tree.cost import VerifyCostModel
from ..verify.warp import SamplingParams
from .llama_peer import LLAMA_METHODS, LlamaPeer
from .llama_spec import SPEC_METHODS, LlamaSpec
from .report import budget_sweep, draft_share, write_report

HF_METHODS = ("hf", "hf-pld", "hf-assisted")
DEFAULT_BUDGETS = (8, 16, 32, 64, 128, "auto")
QUICK_BUDGETS = (32, "auto")
PLD_TOKENS = 10


# -- parsing -------------------------------------------------------------------------------
def parse_budgets(text: str | None) -> list[int | str] | None:
    if text is None:
        return None
    out = []
    for part in str(text).split(","):
        if part.strip():
            b = parse_budget(part)
            if b not in out:
                out.append(b)
    if not out:
        raise ValueError("--budget needs at least one value")
    return out


def paratree_drafters() -> list[str]:
    return [d for d in drafters() if d != "plain"]


# Target variants a method can run on in the same process (MethodSpec.variant): the same model loaded
# again with `exact=False`, so exactness is priced against the non-exact runtime in one run.
VARIANTS = ("inexact",)


@dataclass(frozen=True)
class MethodSpec:
    label: str  # as shown and stored: plain, hf, hf-pld, ngram@32, ngram@auto
    kind: str  # "paratree", "hf" or "llama.cpp"
    drafter: str | None  # paratree drafter name; HF method name for kind "hf"
    budget: int | str | None  # tree budget (root included); 1 for plain; None for HF
    variant: str = ""  # "inexact": a second load of the target with exactness off (label suffix ~inexact)


def expand_methods(methods: list[str] | None, budgets: list[int | str], assistant: str | None = None
                   ) -> tuple[list[MethodSpec], list[str]]:
    """Method specs in run order (plain first) and notes about what was added or skipped."""
    drafters = paratree_drafters()
    notes: list[str] = []
    if methods is None:
        methods = ["plain", "hf", "hf-pld", "hf-assisted", *drafters]
        explicit_assisted = False
    else:
        explicit_assisted = "hf-assisted" in methods
    specs: list[MethodSpec] = []
    seen = set()

    def add(spec: MethodSpec):
        if spec.label not in seen:
            seen.add(spec.label)
            specs.append(spec)

    for m in methods:
        m = m.strip()
        if not m:
            continue
        m, _, variant = m.partition("~")
        name, _, b = m.partition("@")
        if variant and (variant not in VARIANTS or not (name == "plain" or name in drafters)):
            raise ValueError(f"method '{m}~{variant}': only plain and paratree drafters take a variant, "
                             f"one of: {', '.join(VARIANTS)}")
        if variant:
            for bud in ([1] if name == "plain" else [parse_budget(b)] if b else budgets):
                label = "plain" if name == "plain" else f"{name}@{bud}"
                add(MethodSpec(f"{label}~{variant}", "paratree", name, bud, variant))
        elif name == "plain":
            add(MethodSpec("plain", "paratree", "plain", 1))
        elif name in HF_METHODS:
            if b:
                raise ValueError(f"method '{m}': HF methods take no @budget")
            if name == "hf-assisted" and not assistant:
                if explicit_assisted:
                    notes.append("hf-assisted skipped: give an assistant model with --assistant MODEL")
                else:
                    notes.append("hf-assisted skipped (no --assistant MODEL given)")
                continue
            add(MethodSpec(name, "hf", name, None))
        elif name in LLAMA_METHODS:
            if b:
                raise ValueError(f"method '{m}': llama.cpp methods take no @budget")
            add(MethodSpec(name, "llama.cpp", name, None))
        elif name in SPEC_METHODS:  # an exported head in llama.cpp: draft length = budget - 1
            for bud in ([parse_budget(b)] if b else [x for x in budgets if x != "auto"]):
                if not isinstance(bud, int) or bud < 2:
                    raise ValueError(f"method '{m}': llama.cpp drafts a fixed length: give name@N with N >= 2 "
                                     f"(N - 1 draft tokens)")
                add(MethodSpec(f"{name}@{bud}", "llama.cpp", name, bud))
        elif name in drafters:
            for bud in ([parse_budget(b)] if b else budgets):
                add(MethodSpec(f"{name}@{bud}", "paratree", name, bud))
        else:
            choices = ", ".join(["plain", *HF_METHODS, *LLAMA_METHODS, *SPEC_METHODS, *drafters])
            raise ValueError(f"unknown method '{m}': choose from {choices} (drafters also as name@budget)")
    if "plain" not in seen:
        notes.append("plain added: speedups and greedy mismatches are measured against it")
    specs = [MethodSpec("plain", "paratree", "plain", 1)] + [s for s in specs if s.label != "plain"]
    return specs, notes


# -- config / results ---------------------------------------------------------------------------
@dataclass
class BenchConfig:
    datasets: list[str]
    model: str | None = None
    methods: list[str] | None = None
    limit: int | None = 10
    max_new_tokens: int = 128
    budgets: list[int | str] | None = None
    temperature: float = 0.0
    repeats: int = 3
    dtype: str = "auto"
    chat: bool = True
    assistant: str | None = None
    json_out: str | None = None
    report_dir: str | None = None
    quick: bool = False
    seed: int = 0
    progress: bool = True
    command: str | None = None  # the command line, for the report
    heads: dict[str, str] | None = None  # trained head dirs: drafter name or head family -> dir; "*" = any
    compile: bool = False  # single-sequence verify through TorchInductor (models/compiled.py), for every method
    exact: bool | None = None  # gguf's row-invariant attention: speculative == plain bit for bit

    def resolved(self) -> "BenchConfig":
        c = BenchConfig(**self.__dict__)
        if c.quick:
            c.limit, c.max_new_tokens, c.repeats = 2, 32, 1
            c.budgets = c.budgets or list(QUICK_BUDGETS)
        c.budgets = c.budgets or list(DEFAULT_BUDGETS)
        if c.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        if c.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if c.limit is not None and c.limit < 1:
            raise ValueError("--limit must be >= 1")
        if c.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if not c.datasets:
            raise ValueError("--dataset needs at least one dataset")
        return c


def parse_heads(values: list[str] | None) -> dict[str, str] | None:
    """`--head DIR` (every head drafter) or `--head NAME=DIR` (a drafter name or head family)."""
    if not values:
        return None
    out = {}
    for v in values:
        key, sep, path = v.partition("=")
        if not sep:
            key, path = "*", v
        out[key.strip()] = path.strip()
    return out


def build_drafter(name: str, lm, heads: dict[str, str] | None = None, assistant: str | None = None,
                  cost: VerifyCostModel | None = None):
    """make_drafter, with a head directory from `heads` when one is given for this drafter or its family,
    and `assistant` (the hf-assisted draft model) as the draft-model drafter's model: same draft, same run."""
    opts: dict = {"cost": cost}
    if name == "draft-model":
        if not assistant:
            raise ValueError("draft-model needs a draft model: give it with --assistant MODEL")
        opts["draft_model"] = assistant
    family = head_family(name)
    if heads and family:
        opts["head_path"] = heads.get(name) or heads.get(family) or heads.get("*")
    return make_drafter(name, lm, **opts)


@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    profile: dict | None = None
    meta: dict = field(default_factory=dict)
    report_files: list[str] = field(default_factory=list)


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class ForwardCounter:
    """Counts calls of a module (one per target forward), its compiled graph's calls included."""

    def __init__(self, module: torch.nn.Module):
        self._hooked = 0
        self._compiled = getattr(module, "compiled", None)
        self._c0 = self._compiled.calls if self._compiled is not None else 0
        self._h = module.register_forward_pre_hook(self._hook)

    @property
    def n(self) -> int:
        return self._hooked + (self._compiled.calls - self._c0 if self._compiled is not None else 0)

    def _hook(self, *_):
        self._hooked += 1

    def close(self):
        self._h.remove()


def accept_by_depth(depths: list[int]) -> list[float]:
    """[P(>= 1 accepted draft), P(>= 2), ...] over rounds, up to the deepest acceptance."""
    if not depths:
        return []
    top = max(depths)
    n = len(depths)
    return [sum(1 for a in depths if a >= d) / n for d in range(1, top + 1)]


# -- the runners ---------------------------------------------------------------------------
class _Runs:
    """Per (method, dataset): outputs and stats of every repeat."""

    def __init__(self):
        self.repeats: list[dict] = []
        self.proposed: list[int] = []  # auto budget: tree sizes the drafter proposed before pruning

    def new_repeat(self):
        self.repeats.append({"tokens": 0, "seconds": 0.0, "ids": [], "results": [], "forwards": 0, "finish": {},
                             "each": []})
        return self.repeats[-1]

    def add(self, new: list[int], seconds: float, forwards: int, result, reason: str) -> None:
        rep = self.repeats[-1]
        rep["each"].append((len(new), seconds, forwards, reason))
        rep["ids"].append(new)
        rep["results"].append(result)
        self._total(rep)

    def truncate_last(self, n: int) -> None:
        """Keep only the first `n` prompts of the last repeat (an interrupted run)."""
        rep = self.repeats[-1]
        for k in ("each", "ids", "results"):
            del rep[k][n:]
        self._total(rep)

    @staticmethod
    def _total(rep: dict) -> None:
        rep["tokens"] = sum(e[0] for e in rep["each"])
        rep["seconds"] = sum(e[1] for e in rep["each"])
        rep["forwards"] = sum(e[2] for e in rep["each"])
        rep["finish"] = {}
        for e in rep["each"]:
            rep["finish"][e[3]] = rep["finish"].get(e[3], 0) + 1


@dataclass
class _Target:
    """One loaded target of a bench run, with its cost service and its shared runner (made on demand)."""

    lm: LoadedModel
    costs: CostService
    runner: TargetRunner | None = None
    runner_len: int = 0


class Bench:
    def __init__(self, cfg: BenchConfig, console=None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        cfg.dtype = dtype_name(cfg.dtype, cfg.model)
        self.lm = load_model(cfg.model, cfg.dtype, compile=cfg.compile, exact=cfg.exact)
        self.dtype = self.lm.model.embed.weight.dtype
        self._hf = None
        self._assistant = None
        self._llama: LlamaPeer | None = None
        self._llama_spec: LlamaSpec | None = None
        self.costs = self._cost_service(self.lm)
        # per target variant ("" = the configured target): its model, cost service and shared runner
        self._targets: dict[str, _Target] = {"": _Target(self.lm, self.costs)}

    def _cost_service(self, lm):
        return CostService(lm, on_calibrate=lambda: self.console.print(
            "[dim]no calibration profile for this model/dtype/machine: running a short "
            "calibration (run `paratree calibrate` for the full curve)[/dim]"))

    def target(self, variant: str = "") -> "_Target":
        """A target variant; "inexact" (the same model with exactness off) is loaded on first use."""
        if variant not in self._targets:
            lm = load_model(self.cfg.model, self.cfg.dtype, compile=self.cfg.compile, exact=False)
            self._targets[variant] = _Target(lm, self._cost_service(lm))
        return self._targets[variant]

    @property
    def profile(self) -> dict | None:
        return self.costs.stored_profile()

    def runner(self, need: int, variant: str = ""):
        """The variant's shared target runner, grown when a longer prompt shows up."""
        tg = self.target(variant)
        if tg.runner is None or need > tg.runner_len:
            tg.runner = None
            tg.runner_len = min(tg.lm.config.max_position, max(need, 512))
            tg.runner = TargetRunner(tg.lm.model, max_len=tg.runner_len)
        return tg.runner

    def hf_model(self):
        """HF transformers on the same weights (shared memory: a 1.5B target and its twin fit together)."""
        if self._hf is None:

            hf_logging.set_verbosity_error()
            self._hf = hf_twin(self.lm)
        return self._hf

    def assistant_model(self):
        """The hf-assisted draft model, sharing weights with the draft-model drafter's copy of it."""
        if self._assistant is None:

            self._assistant = hf_twin(draft_lm(self.cfg.assistant, self.dtype))
        return self._assistant

    def make_generator(self, spec: MethodSpec, need: int):
        tg = self.target(spec.variant)
        lm, costs, runner = tg.lm, tg.costs, self.runner(need, spec.variant)
        drafter = build_drafter(spec.drafter, lm, self.cfg.heads, self.cfg.assistant, costs.verify_curve())
        sizer, budget = None, spec.budget
        if spec.budget == "auto":
            sizer = costs.auto_sizer(spec.drafter)
            budget = sizer.max_nodes
        return Generator(runner, drafter, eos_ids=lm.eos_ids, budget=int(budget), sizer=sizer)

    def params(self, i: int):
        return SamplingParams(temperature=self.cfg.temperature, seed=self.cfg.seed + i)

    def run_paratree(self, gen, ids: list[int], i: int, counter: ForwardCounter, max_new: int | None = None):
        c0 = counter.n
        t = time.perf_counter()
        res = gen.generate(ids, max_new or self.cfg.max_new_tokens, self.params(i))
        dt = time.perf_counter() - t
        return res.token_ids, dt, counter.n - c0, res

    def llama(self, need: int) -> LlamaPeer:
        """The llama.cpp peer on this model's GGUF, with a context of `need` tokens, same threads as torch."""
        if self._llama is None or self._llama.n_ctx < need:

            self._llama = LlamaPeer(source_gguf(self.lm.path), need, torch.get_num_threads())
        return self._llama

    def llama_spec(self) -> LlamaSpec:
        if self._llama_spec is None:
            self._llama_spec = LlamaSpec(source_gguf(self.lm.path), self.lm.path, self.cfg.heads,
                                         torch.get_num_threads())
        return self._llama_spec

    def run_llama(self, spec: MethodSpec, ids: list[int], i: int, need: int, max_new: int | None = None):
        max_new = max_new or self.cfg.max_new_tokens
        if spec.drafter in SPEC_METHODS:
            if self.cfg.temperature > 0:
                raise ValueError(f"{spec.label} runs greedy only (llama-speculative-simple at --temp 0)")
            text = self.lm.tokenizer.decode(ids, skip_special_tokens=False)
            out, stats = self.llama_spec().generate(spec.drafter, int(spec.budget), text, max_new, need)
            new = self.lm.tokenizer.encode(out, add_special_tokens=False)[:max_new]
            return new, stats["seconds"], stats["rounds"], None
        peer = self.llama(need)
        t = time.perf_counter()
        new = peer.generate(spec.drafter, ids, max_new, self.lm.eos_ids,
                            self.cfg.temperature, self.cfg.seed + i)
        return new, time.perf_counter() - t, 0, None

    def run_hf(self, spec: MethodSpec, ids: list[int], i: int, counter: ForwardCounter, max_new: int | None = None):
        model = self.hf_model()
        tok = self.lm.tokenizer
        eos = sorted(self.lm.eos_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        kw = dict(max_new_tokens=max_new or self.cfg.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad)
        if self.cfg.temperature > 0:
            kw.update(do_sample=True, temperature=self.cfg.temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False)
        extra = {}
        if spec.drafter == "hf-pld":
            kw["prompt_lookup_num_tokens"] = PLD_TOKENS
        elif spec.drafter == "hf-assisted":
            extra["assistant_model"] = self.assistant_model()
        x = torch.tensor([ids])
        if self.cfg.temperature > 0:
            torch.manual_seed(self.cfg.seed + i)
        c0 = counter.n
        t = time.perf_counter()
        with torch.inference_mode():
            # attention_mask explicitly: the prompt may contain the pad token id (SmolLM2: 2)
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=GenerationConfig(**kw),
                                 **extra)
        dt = time.perf_counter() - t
        new = out[0, len(ids):].tolist()
        return new, dt, counter.n - c0, None


# -- aggregation -------------------------------------------------------------------------------
def summarize(spec: MethodSpec, dataset: str, runs: _Runs, cfg: BenchConfig, n_prompts: int) -> dict:
    reps = runs.repeats
    measured = reps[1:] if len(reps) >= 2 else reps
    tps = [r["tokens"] / max(r["seconds"], 1e-9) for r in measured]
    results = [res for r in measured for res in r["results"] if res is not None]
    last = measured[-1]
    row = {
        "method": spec.label,
        "dataset": dataset,
        "kind": spec.kind,
        "drafter": spec.drafter,
        "budget": spec.budget,
        "n_prompts": n_prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "repeats_run": len(reps),
        "repeats_measured": len(measured),
        "warmup_excluded": len(reps) >= 2,
        "new_tokens": last["tokens"],
        "target_forwards": last["forwards"],
        # llama-cpp-python does not expose its forward count; llama-speculative-simple's statistics do
        "tokens_per_forward": None if spec.kind == "llama.cpp" and not last["forwards"] else
        last["tokens"] / max(1, last["forwards"]),
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_repeats": tps,
        "wall_s": last["seconds"],
        "finish_reasons": dict(last["finish"]),
        "speedup": None,
        "greedy_mismatches": None,
        "mismatch_prompts": None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # paratree-only stats (None for HF methods, which do not expose them)
        "tau": None,
        "rounds": None,
        "accept_by_depth": None,
        "draft_s": None,
        "verify_s": None,
        "prefill_s": None,
        "draft_frac": None,
        "draft_per_verify": None,
        "mean_tree_size": None,
        "mean_proposed_size": None,
        "verify_s_per_round": None,
    }
    if spec.kind == "paratree" and results:
        emitted = sum(sum(r.accepted_per_round) for r in results)
        rounds = sum(r.rounds for r in results)
        depths = [d for r in results for d in r.accept_depths]
        sizes = [s for r in results for s in r.tree_sizes]
        draft = sum(r.time_draft for r in results)
        verify = sum(r.time_verify for r in results)
        row.update(
            tau=emitted / max(1, rounds),
            rounds=sum(r.rounds for r in last["results"]),
            accept_by_depth=accept_by_depth(depths),
            draft_s=draft / len(measured),
            verify_s=verify / len(measured),
            prefill_s=sum(r.time_prefill for r in results) / len(measured),
            draft_frac=draft / max(draft + verify, 1e-12),
            draft_per_verify=draft / max(verify, 1e-12),  # issue 26's bar: a head's draft pass <= 20% of a verify
            mean_tree_size=statistics.fmean(sizes) if sizes else None,
            verify_s_per_round=verify / max(1, rounds),
        )
        if runs.proposed:
            row["mean_proposed_size"] = statistics.fmean(runs.proposed)
    if spec.drafter in SPEC_METHODS:  # rounds counted from llama.cpp's own statistics
        row.update(tau=row["tokens_per_forward"], rounds=last["forwards"])
    return row


def _write_json(path: str, rows: list[dict]) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    tmp.replace(p)


def _fmt(v, spec="{:.2f}", none="–"):
    return none if v is None else spec.format(v)


def print_table(rows: list[dict], console=None, title: str = "paratree bench") -> None:
    console = console or Console()
    t = Table(title=title)
    for c, j in (("dataset", "left"), ("method", "left"), ("τ (+bonus)", "right"), ("tok/fwd", "right"),
                 ("tok/s", "right"), ("speedup", "right"), ("acc≥1/2/3", "right"), ("draft/verify", "right"),
                 ("tree", "right"), ("peak RSS MB", "right"), ("greedy ≠ plain", "right")):
        t.add_column(c, justify=j)
    for r in rows:
        acc = r.get("accept_by_depth")
        acc_s = "–" if acc is None else "/".join(f"{(acc[d] if d < len(acc) else 0.0):.2f}" for d in range(3))
        split = "–" if r.get("draft_s") is None else f"{r['draft_s']:.2f}s/{r['verify_s']:.2f}s{draft_share(r)}"
        mm = r.get("greedy_mismatches")
        mm_s = "n/a" if mm is None else f"{mm}/{r['n_prompts']}"
        t.add_row(r["dataset"], r["method"], _fmt(r.get("tau")), _fmt(r.get("tokens_per_forward")),
                  _fmt(r["tokens_per_s"], "{:.1f}"), _fmt(r.get("speedup"), "{:.2f}x"), acc_s, split,
                  _fmt(r.get("mean_tree_size"), "{:.1f}"), _fmt(r.get("peak_rss_mb"), "{:.0f}"), mm_s)
    console.print(t)


def environment(cfg: BenchConfig, lm) -> dict:
    return {
        "model": lm.name, "model_path": str(lm.path), "dtype": cfg.dtype, "cpu": cpu_signature(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "compile": cfg.compile, "exact": cfg.exact,
    }


def probe_drafters(specs: list[MethodSpec], lm, notes: list[str], heads=None, assistant=None) -> list[MethodSpec]:
    """Drop paratree drafters that cannot be built for this model (e.g. no trained head), one note each."""
    bad: dict[str, str] = {}
    for name in dict.fromkeys(s.drafter for s in specs if s.kind == "paratree" and s.drafter != "plain"):
        try:
            build_drafter(name, lm, heads, assistant)
        except Exception as e:
            bad[name] = f"{type(e).__name__}: {e}"
    for name, why in bad.items():
        notes.append(f"{name} skipped: {why}")
    return [s for s in specs if not (s.kind == "paratree" and s.drafter in bad)]


def _out_console():
    c = Console()
    return c if c.is_terminal else Console(width=220)


def _method_failed(result, console, ds: str, spec, e: Exception) -> None:
    msg = f"{ds} · {spec.label} failed: {type(e).__name__}: {e}"
    result.notes.append(msg)
    console.print(f"[red]{msg}[/red]")


def _align_partial(live: dict) -> None:
    """After Ctrl-C: every method keeps the same prompts. An unfinished last repeat is dropped
    when a finished one exists, else cut to the prompts that every method completed."""
    if not live:
        return
    done = min(len(e[3].repeats[-1]["ids"]) if e[3].repeats else 0 for e in live.values())
    for e in live.values():
        runs = e[3]
        if not runs.repeats:
            continue
        if len(runs.repeats) > 1:
            if done < len(runs.repeats[0]["ids"]):  # some method has not finished the last repeat
                runs.repeats.pop()
        else:
            runs.truncate_last(done)


def _rows_for(result, bench, cfg, lm, ds: str, specs, live: dict, n_prompts: int) -> None:
    """Rows of one dataset, in method order, with speedup and greedy mismatches against plain."""
    plain_ids = plain_tps = None
    for spec in specs:
        entry = live.get(spec.label)
        if entry is None or not entry[3].repeats or not entry[3].repeats[-1]["ids"]:
            continue
        gen, runs = entry[1], entry[3]
        if spec.kind == "paratree" and gen.sizer is not None:
            runs.proposed = gen.sizer.proposed_nodes
        row = summarize(spec, ds, runs, cfg, len(runs.repeats[-1]["ids"]) if result.interrupted else n_prompts)
        row["model"], row["dtype"] = lm.name, cfg.dtype
        if spec.label == "plain":
            plain_ids, plain_tps = runs.repeats[-1]["ids"], row["tokens_per_s"]
        if plain_tps:
            row["speedup"] = row["tokens_per_s"] / plain_tps
        if cfg.temperature == 0 and plain_ids is not None:
            bad = [i for i, (a, b) in enumerate(zip(runs.repeats[-1]["ids"], plain_ids)) if a != b]
            row["greedy_mismatches"], row["mismatch_prompts"] = len(bad), bad
        if spec.budget == "auto" and bench.profile is not None:
            row["profile"] = bench.profile.get("path")
        result.rows.append(row)
    if cfg.json_out:
        _write_json(cfg.json_out, result.rows)


# -- the driver -------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, console=None, out_console=None) -> BenchResult:
    """Run every method on every dataset; write --json / --report even when interrupted (Ctrl-C)."""

    cfg = cfg.resolved()
    console = console or Console(stderr=True)
    out_console = out_console or _out_console()
    specs, notes = expand_methods(cfg.methods, cfg.budgets, cfg.assistant)
    # datasets first: a bad path fails before the model loads
    prompts_by_ds = {ds: load_prompts(ds, cfg.limit) for ds in cfg.datasets}
    for ds, ps in prompts_by_ds.items():
        if not ps:
            raise ValueError(f"dataset '{ds}' has no prompts")
    bench = Bench(cfg, console)
    lm = bench.lm
    result = BenchResult(notes=notes, meta=environment(cfg, lm))
    specs = probe_drafters(specs, lm, result.notes, cfg.heads, cfg.assistant)
    ids_by_ds = {}
    max_budget = max([b for b in cfg.budgets if isinstance(b, int)] + [256])
    for ds, ps in prompts_by_ds.items():
        ids = [encode_prompt(lm.tokenizer, p, cfg.chat) for p in ps]
        fit = [x for x in ids if len(x) + cfg.max_new_tokens + 1 <= lm.config.max_position]
        if len(fit) < len(ids):
            result.notes.append(f"{ds}: {len(ids) - len(fit)} prompt(s) longer than the context window skipped")
        ids_by_ds[ds] = fit
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")

    total = sum(len(ids) * cfg.repeats for ids in ids_by_ds.values()) * len(specs)
    hf_counter = None
    own_counter = ForwardCounter(lm.model)
    counters = {"": own_counter}  # per target variant
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=not cfg.progress, transient=False)
    try:
        with progress:
            task = progress.add_task("bench", total=total)
            for ds, all_ids in ids_by_ds.items():
                if not all_ids:
                    continue
                need = max(len(x) for x in all_ids) + cfg.max_new_tokens + max_budget + 8
                live: dict[str, list] = {}  # label -> [spec, generator (paratree) or None, counter, runs]
                for spec in specs:  # set-up, then a 4-token warm-up keeps one-time initialisation out of timings
                    progress.update(task, description=f"{ds} · warm-up {spec.label}")
                    try:
                        if spec.kind == "paratree":
                            gen = bench.make_generator(spec, need)
                            if spec.variant not in counters:
                                counters[spec.variant] = ForwardCounter(bench.target(spec.variant).lm.model)
                            counter = counters[spec.variant]
                            bench.run_paratree(gen, all_ids[0], 0, counter, max_new=4)
                        elif spec.kind == "llama.cpp":
                            gen, counter = None, None
                            bench.run_llama(spec, all_ids[0], 0, need, max_new=4)
                        else:
                            gen, model = None, bench.hf_model()
                            if hf_counter is None:
                                hf_counter = ForwardCounter(model)
                            counter = hf_counter
                            bench.run_hf(spec, all_ids[0], 0, counter, max_new=4)
                        live[spec.label] = [spec, gen, counter, _Runs()]
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # one broken method must not lose the others
                        _method_failed(result, console, ds, spec, e)
                        progress.advance(task, len(all_ids) * cfg.repeats)
                try:
                    for _rep in range(cfg.repeats):
                        for entry in live.values():
                            entry[3].new_repeat()
                        for i, ids in enumerate(all_ids):
                            labels = list(live)
                            for label in labels[i % len(labels):] + labels[: i % len(labels)] if labels else []:
                                spec, gen, counter, runs = live[label]
                                progress.update(task, description=f"{ds} · prompt {i + 1}/{len(all_ids)} · {label}")
                                try:
                                    if spec.kind == "paratree":
                                        new, dt, fwd, res = bench.run_paratree(gen, ids, i, counter)
                                        reason = res.finish_reason
                                    elif spec.kind == "llama.cpp":
                                        new, dt, fwd, res = bench.run_llama(spec, ids, i, need)
                                        reason = "stop" if new and new[-1] in lm.eos_ids else "length"
                                    else:
                                        new, dt, fwd, res = bench.run_hf(spec, ids, i, counter)
                                        reason = "stop" if new and new[-1] in lm.eos_ids else "length"
                                except KeyboardInterrupt:
                                    raise
                                except Exception as e:
                                    _method_failed(result, console, ds, spec, e)
                                    del live[label]
                                    progress.advance(task, len(all_ids) * cfg.repeats - sum(
                                        len(r["ids"]) for r in runs.repeats))
                                    continue
                                runs.add(new, dt, fwd, res, reason)
                                progress.advance(task)
                except KeyboardInterrupt:
                    result.interrupted = True
                    _align_partial(live)
                    raise
                finally:
                    _rows_for(result, bench, cfg, lm, ds, specs, live, len(all_ids))
    except KeyboardInterrupt:
        result.interrupted = True
        result.notes.append("interrupted (Ctrl-C): partial rows, every method on the same prompts "
                            "(an unfinished repeat is dropped)")
        console.print("[yellow]interrupted: writing what finished[/yellow]")
    finally:
        for c in counters.values():
            c.close()
        if hf_counter is not None:
            hf_counter.close()
    result.profile = bench.profile
    if result.rows:
        print_table(result.rows, out_console, title=f"paratree bench · {lm.name} ({cfg.dtype}) · "
                    f"{cfg.max_new_tokens} new tokens · T={cfg.temperature}")

        for sw in budget_sweep(result.rows):
            vs128 = "" if sw["auto_vs_128"] is None else f", {sw['auto_vs_128']:.2f}x @128"
            out_console.print(f"{sw['dataset']} · {sw['drafter']}: auto {sw['auto_tokens_per_s']:.1f} tok/s = "
                              f"{sw['auto_vs_best']:.2f}x the best fixed budget (@{sw['best_budget']}){vs128}")
    for n in result.notes:
        out_console.print(f"[dim]note: {n}[/dim]")
    if cfg.json_out:
        _write_json(cfg.json_out, result.rows)
    if cfg.report_dir:

        if result.profile is None and not result.interrupted:
            try:
                result.profile = bench.costs.profile()
            except KeyboardInterrupt:
                result.interrupted = True
        result.report_files = write_report(cfg.report_dir, result, cfg)
        console.print(f"[dim]report: {Path(cfg.report_dir) / 'report.md'}[/dim]")
    return result
