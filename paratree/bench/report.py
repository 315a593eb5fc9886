"""`paratree bench --report DIR`: report.md plus PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, files: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    files.append(str(path))


def plot_speedup(rows: list[dict], path: Path, files: list[str]) -> None:
    plt = _plt()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(methods) * max(1, len(datasets)) + 2), 4.2))
    width = 0.8 / max(1, len(datasets))
    for k, ds in enumerate(datasets):
        by = {r["method"]: r for r in rows if r["dataset"] == ds}
        xs = [i + (k - (len(datasets) - 1) / 2) * width for i in range(len(methods))]
        ys = [(by[m].get("speedup") or 0.0) if m in by else 0.0 for m in methods]
        bars = ax.bar(xs, ys, width=width, label=ds)
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=35, ha="right")
    ax.set_ylabel("speedup vs plain (wall-clock tokens/s)")
    ax.set_title("Speedup per method and dataset")
    ax.legend(fontsize=8)
    _save(fig, path, files)


def plot_tau_vs_budget(rows: list[dict], path: Path, files: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    own = [r for r in rows if r.get("kind") == "paratree" and r.get("drafter") != "plain" and r.get("tau") is not None]
    series = {}
    for r in own:
        series.setdefault((r["drafter"], r["dataset"]), []).append(r)
    for (drafter, ds), rs in series.items():
        fixed = sorted((r for r in rs if isinstance(r["budget"], int)), key=lambda r: r["budget"])
        line = None
        if fixed:
            (line,) = ax.plot([r["budget"] for r in fixed], [r["tau"] for r in fixed], marker="o",
                              label=f"{drafter} · {ds}")
        for r in rs:
            if r["budget"] == "auto":
                x = r.get("mean_tree_size") or 1.0
                ax.scatter([x], [r["tau"]], marker="*", s=140, color=None if line is None else line.get_color(),
                           zorder=3, label=None if line is not None else f"{drafter} · {ds} (auto)")
                ax.annotate("auto", (x, r["tau"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    plain = [r for r in rows if r.get("drafter") == "plain" and r.get("tau") is not None]
    if plain:
        ax.axhline(plain[0]["tau"], color="gray", lw=0.8, ls="--", label="plain")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree budget (nodes per verify, root included); auto at its mean tree size")
    ax.set_ylabel("τ (tokens per verify round, bonus included)")
    ax.set_title("τ vs tree budget")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path, files)


def plot_accept_depth(rows: list[dict], path: Path, files: list[str]) -> None:
    plt = _plt()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5.2 * max(1, len(datasets)), 4.0), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for r in rows:
            acc = r.get("accept_by_depth")
            if r["dataset"] != ds or not acc or r.get("drafter") == "plain":
                continue
            ax.plot(range(1, len(acc) + 1), acc, marker=".", label=r["method"])
        ax.set_xlabel("depth d")
        ax.set_ylabel("fraction of rounds with ≥ d accepted drafts")
        ax.set_ylim(0, 1)
        ax.set_title(f"Acceptance per depth · {ds}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path, files)


def plot_verify_latency(profile: dict | None, rows: list[dict], path: Path, files: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if profile and profile.get("verify_points"):
        pts = profile["verify_points"]
        ax.plot([p[0] for p in pts], [1e3 * p[1] for p in pts], marker="o",
                label=f"calibrate (median, past {profile.get('past_len')} tokens)")
    own = [r for r in rows if r.get("verify_s_per_round") and r.get("mean_tree_size")]
    if own:
        ax.scatter([r["mean_tree_size"] for r in own], [1e3 * r["verify_s_per_round"] for r in own], marker="x",
                   color="C3", label="bench: verify+accept+commit per round")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree size (nodes)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Verify latency vs tree size")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no calibration profile", ha="center", transform=ax.transAxes)
    _save(fig, path, files)


def draft_share(r: dict) -> str:
    """' (N%)': the draft time as a share of the verify time, when the row has both."""
    return "" if r.get("draft_per_verify") is None else f" ({r['draft_per_verify']:.0%})"


def _cell(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = ("| dataset | method | τ (tokens/round, bonus incl.) | tokens/forward | tokens/s | speedup | "
            "acc ≥1 / ≥2 / ≥3 | draft s / verify s (draft ÷ verify) | mean tree | peak RSS MB | greedy ≠ plain |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        acc = r.get("accept_by_depth")
        acc_s = "–" if acc is None else " / ".join(f"{(acc[d] if d < len(acc) else 0.0):.2f}" for d in range(3))
        split = "–" if r.get("draft_s") is None else f"{r['draft_s']:.2f} / {r['verify_s']:.2f}{draft_share(r)}"
        mm = r.get("greedy_mismatches")
        mm_s = "n/a" if mm is None else f"{mm}/{r['n_prompts']}"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {_cell(r.get('tau'))} | {_cell(r.get('tokens_per_forward'))} | "
            f"{_cell(r['tokens_per_s'], '{:.1f}')} | {_cell(r.get('speedup'), '{:.2f}x')} | {acc_s} | {split} | "
            f"{_cell(r.get('mean_tree_size'), '{:.1f}')} | {_cell(r.get('peak_rss_mb'), '{:.0f}')} | "
            f"{mm_s} |"
        )
    return "\n".join(lines)


def budget_sweep(rows: list[dict], tolerance: float = 0.05) -> list[dict]:
    """`auto` against the fixed budgets of the same drafter on the same dataset (issue bar: within
    `tolerance` of the best fixed budget, and faster than the GPU-style default of 128)."""
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("kind") == "paratree" and r.get("drafter") != "plain" and r.get("tokens_per_s"):
            groups.setdefault((r["dataset"], r["drafter"]), []).append(r)
    for (ds, drafter), rs in groups.items():
        auto = next((r for r in rs if r["budget"] == "auto"), None)
        fixed = [r for r in rs if isinstance(r["budget"], int)]
        if auto is None or not fixed:
            continue
        best = max(fixed, key=lambda r: r["tokens_per_s"])
        r128 = next((r for r in fixed if r["budget"] == 128), None)
        ratio = auto["tokens_per_s"] / best["tokens_per_s"]
        out.append({"dataset": ds, "drafter": drafter, "auto_tokens_per_s": auto["tokens_per_s"],
                    "auto_mean_tree": auto.get("mean_tree_size"), "best_budget": best["budget"],
                    "best_tokens_per_s": best["tokens_per_s"], "auto_vs_best": ratio,
                    "auto_vs_128": None if r128 is None else auto["tokens_per_s"] / r128["tokens_per_s"],
                    "within_tolerance": ratio >= 1.0 - tolerance})
    return out


def budget_sweep_table(sweep: list[dict]) -> str:
    lines = ["| dataset | drafter | auto tok/s (mean tree) | best fixed budget (tok/s) | auto / best | auto / @128 | "
             "within 5% |", "|---|---|---:|---:|---:|---:|---|"]
    for s in sweep:
        lines.append(f"| {s['dataset']} | {s['drafter']} | {s['auto_tokens_per_s']:.1f} "
                     f"({_cell(s['auto_mean_tree'], '{:.1f}')}) | @{s['best_budget']} ({s['best_tokens_per_s']:.1f}) | "
                     f"{s['auto_vs_best']:.2f}x | {_cell(s['auto_vs_128'], '{:.2f}x')} | "
                     f"{'yes' if s['within_tolerance'] else 'no'} |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, result, cfg) -> list[str]:
    """Write report.md, results.json and the PNGs; returns the written paths. Never raises on empty rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    files: list[str] = []
    plots = [
        ("speedup.png", "Speedup vs plain", lambda p: plot_speedup(rows, p, files)),
        ("tau_vs_budget.png", "τ vs tree budget", lambda p: plot_tau_vs_budget(rows, p, files)),
        ("acceptance_by_depth.png", "Acceptance per depth", lambda p: plot_accept_depth(rows, p, files)),
        ("verify_latency.png", "Verify latency vs tree size",
         lambda p: plot_verify_latency(result.profile, rows, p, files)),
    ]
    made = []
    for name, title, fn in plots:
        try:
            fn(out / name)
            made.append((name, title))
        except Exception as e:  # a plot must never cost the numbers
            result.notes.append(f"plot {name} failed: {type(e).__name__}: {e}")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    files.append(str(out / "results.json"))
    m = result.meta
    md = [f"# paratree bench report{' (partial: interrupted)' if result.interrupted else ''}", ""]
    if cfg.command:
        md += ["```bash", cfg.command, "```", ""]
    md += [
        f"- model: `{m.get('model')}` ({m.get('dtype')}), checkpoint `{m.get('model_path')}`",
        f"- machine: `{m.get('cpu')}`, {m.get('cpu_count')} CPUs, torch threads {m.get('torch_threads')}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, Python {m.get('python')}; {m.get('date')}",
        f"- datasets: {', '.join(cfg.datasets)}; prompts per dataset: {cfg.limit}; max new tokens "
        f"{cfg.max_new_tokens}; temperature {cfg.temperature}; chat template: {cfg.chat}",
        f"- repeats {cfg.repeats} per method "
        f"({'first is a warm-up and excluded' if cfg.repeats >= 2 else 'single repeat, nothing excluded'}); "
        "tokens/s = median over measured repeats of new tokens / wall seconds (prefill included)",
        "- τ = mean tokens emitted per verify round, bonus token included (paratree methods only); "
        "tokens/forward = new tokens / target forwards (a forward pre-hook counts them; HF's prefill forward "
        "emits the first token, paratree's prefill does not, so plain paratree sits just under 1)",
        "- acc ≥d = fraction of verify rounds with at least d accepted draft tokens; greedy ≠ plain = prompts "
        "whose token ids differ from `plain` (bf16 near-ties can flip greedy choices between different "
        "kernels/tree shapes; fp32/fp64 runs are exact)",
        "",
        markdown_table(rows) if rows else "_no method finished_",
        "",
    ]
    sweep = budget_sweep(rows)
    if sweep:
        md += ["## Budget sweep: `auto` against fixed tree budgets", "",
               "Same drafter, same dataset, same run; tokens/s as above.", "", budget_sweep_table(sweep), ""]
    if result.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.profile:
        p = result.profile
        md += ["## Calibration profile", "",
               f"`{p.get('path')}` — verify latency medians over {p.get('repeats')} repeats after "
               f"{p.get('past_len')} cached tokens; per-round overhead {1e3 * p.get('round_overhead_s', 0):.2f} ms; "
               "draft latency: " + ", ".join(
                   f"{k} {1e3 * v['seconds']:.2f} ms" if "seconds" in v else f"{k} (unavailable)"
                   for k, v in (p.get("draft") or {}).items()), "",
               "| nodes | " + " | ".join(str(n) for n, _ in p["verify_points"]) + " |",
               "|---|" + "---|" * len(p["verify_points"]),
               "| ms | " + " | ".join(f"{1e3 * s:.2f}" for _, s in p["verify_points"]) + " |", ""]
    for name, title in made:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    (out / "report.md").write_text("\n".join(md))
    files.append(str(out / "report.md"))
    return files
