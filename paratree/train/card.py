"""MODEL_CARD.md for a trained head: how it was made and what it measured, from the run's own records."""

from __future__ import annotations

import json
from pathlib import Path

from ..drafters.registry import head_family_of


def write_model_card(head_dir: str | Path, train_command: str, data_command: str,
                     bench_rows: list[dict] | None = None, bench_command: str = "", notes: str = "") -> Path:
    head_dir = Path(head_dir)
    missing = [n for n in ("train_summary.json", "head_config.json", "head.safetensors") if not (head_dir / n).is_file()]
    if missing:
        raise ValueError(f"'{head_dir}' lacks {', '.join(missing)}: --head must be a `paratree train` output directory")
    summary = json.loads((head_dir / "train_summary.json").read_text())
    cfg = json.loads((head_dir / "head_config.json").read_text())
    tc = summary["config"]
    size_mb = (head_dir / "head.safetensors").stat().st_size / 1e6
    family = head_family_of(cfg["family"])
    lines = [
        f"# {cfg['family']} draft head for {cfg['target_name']}",
        "",
        f"- Architecture: {cfg['num_layers']} layer(s), hidden {cfg['target_hidden']}, "
        + family.card_architecture(cfg)
        + f", taps from target layers {cfg['tap_layers']}, {family.card_shares}"
        + (f" (predicts over a {cfg['draft_vocab']}-token draft vocab: the most frequent tokens of the "
           f"training responses, mapped back to target ids)." if cfg.get("draft_vocab") else "."),
        f"- Parameters: {summary['head_params'] / 1e6:.2f} M; file: head.safetensors, bf16, {size_mb:.1f} MB.",
        family.card_loss(cfg, tc, summary),
        "",
        "## How it was made",
        "",
        "Data (the target's own greedy responses to training prompts; no evaluation split):",
        "",
        f"```\n{data_command}\n```",
        "",
        "Training:",
        "",
        f"```\n{train_command}\n```",
        "",
        f"- Sequences: {summary['train_sequences']} train / {summary['eval_sequences']} held out, "
        f"{summary['train_tokens']} train tokens (prompt + response).",
        f"- Steps: {summary['steps']} ({tc['seqs_per_step']} sequences x "
        f"{family.card_rows_per_sequence(tc)} per step), "
        f"lr {tc['lr']}, {summary['world_size']} process(es).",
        *([f"- Initialised from the head at `{tc['init_from']}` (its own card and command: an earlier stage), "
           "not from random weights; its draft vocab is kept."] if tc.get("init_from") else []),
        f"- Wall time: {summary['wall_time_s'] / 60:.1f} min on {summary['machine']}.",
        f"- Final held-out loss {summary['final'].get('eval_loss', float('nan')):.3f}, teacher-forced chain τ "
        f"{summary['final'].get('eval_tau_tf', float('nan')):.2f}.",
        "",
    ]
    if bench_rows:
        lines += ["## Measured (greedy, prompts the head never saw)", "", f"```\n{bench_command}\n```", "",
                  "| dataset | method | τ (tokens per verify, bonus incl.) | tokens/s | speedup vs plain | greedy mismatches |",
                  "|---|---|---:|---:|---:|---:|"]
        def f(v, spec):
            return "-" if v is None else format(v, spec)

        for r in bench_rows:
            lines.append(f"| {r['dataset']} | {r['method']} | {f(r.get('tau'), '.2f')} | "
                         f"{f(r.get('tokens_per_s'), '.1f')} | {f(r.get('speedup'), '.2f')}{'' if r.get('speedup') is None else 'x'} | "
                         f"{f(r.get('greedy_mismatches'), '')} |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", notes, ""]
    out = head_dir / "MODEL_CARD.md"
    out.write_text("\n".join(lines))
    return out
