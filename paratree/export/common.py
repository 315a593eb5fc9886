"""What every export does: load the head with its target, refuse what the format cannot express
(one line naming every difference), write `model.safetensors`, `config.json` and a short card."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..drafters.registry import head_family_of, read_head_config
from ..models.loader import load_model


def backbone_refusals(cfg) -> list[str]:
    """What keeps a block head from the DFlash/DSpark backbone's function (both formats read raw taps
    into fc, and their anchor row is the anchor's embedding)."""
    out = []
    if cfg.tap_norm:
        out.append("it RMS-normalises each tap before fc (train with tap_norm: false)")
    if cfg.root_in:
        out.append("its root row mixes the root's embedding with the state before it (train with root_in: false)")
    return out


def load_for_export(head_dir, fmt: str, refusals, lm=None):
    """(head in fp32, its target, head config); ValueError if `refusals(cfg)` names anything."""
    cfg = read_head_config(head_dir)
    why = refusals(cfg)
    if why:
        raise ValueError(f"'{head_dir}' cannot be written as {fmt} without changing its function: " + "; ".join(why))
    head = head_family_of(cfg.family).load_head(head_dir, dtype=torch.float32)
    lm = lm if lm is not None else load_model(cfg.target_name or None, "fp32", tokenizer=False)
    head.check_target(lm.config)
    return head, lm, cfg


def _card_lines(head_dir) -> str:
    """Training command and measured τ from the head's own MODEL_CARD.md, when it has one."""
    card = Path(head_dir) / "MODEL_CARD.md"
    if not card.is_file():
        return ""
    lines = card.read_text().splitlines()
    keep = [f"Training: `{ln.strip()}`" for ln in lines if ln.startswith("paratree train")]
    keep += [ln for ln in lines if "held-out" in ln]
    keep += [""] + [ln for ln in lines if ln.startswith("|")]  # the measured table (τ, tokens/s)
    return "\n## From the head's model card\n\n" + "\n".join(keep) + "\n" if len(keep) > 1 else ""


def write_checkpoint(out_dir, tensors: dict, config: dict, head_dir, fmt: str, details: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))  # fp32: the target's rows are copied without rounding
    (out / "config.json").write_text(json.dumps(config, indent=2))
    target = config.get("paratree", {}).get("target_name", "")
    (out / "README.md").write_text(
        f"# {fmt} draft head for {target}\n\nExported by `paratree export {head_dir} --format {fmt}`. {details}\n"
        + _card_lines(head_dir))
    return out
