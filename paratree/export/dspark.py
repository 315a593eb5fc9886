"""DSpark checkpoint format (deepseek-ai DeepSpec `Qwen3DSparkModel`; llama.cpp converts it to its
`dflash` arch with `markov_w1`, run as `--spec-type draft-dspark`). Layout and forward:
docs/export_formats_notes.md §2-§3, read from DeepSpec, z-lab/dflash and llama.cpp's converter.

The layout mapping (both ways) is `drafters/heads/dspark_format.py`. paratree's DSpark head is that
function when it was trained with `tap_norm: false` and `root_in: false`: `hidden_norm(fc(cat(taps)))` context features, Qwen3-style layers (q/k norms,
context K/V projected without `input_layernorm`), an anchor-first block [anchor, mask, ...] whose
slot i predicts the token after position n + i, and a vanilla Markov head plus a confidence head
over [h ; w1[prev]]. What differs only in layout is rewritten exactly:
- fused `wkv` / `w13` are split into k/v and gate/up projections;
- the learned mask embedding becomes row `mask_token_id` of the draft's own `embed_tokens` (a copy
  of the target's), which the format's block input reads;
- the reduced draft vocab becomes `lm_head` = the target's LM-head rows `d2t`, and `d2t` is
  stored as offsets (`target id = i + d2t[i]`);
- the confidence temperature T is folded into the confidence projection (w / T, b / T).
"""

from __future__ import annotations

from pathlib import Path

from ..drafters.heads.dspark_format import to_dspark
from .common import backbone_refusals, load_for_export, write_checkpoint


def refusals(cfg) -> list[str]:
    out = []
    if cfg.family != "dspark":
        out.append(f"it is a {cfg.family} head (the format needs a DSpark head: Markov + confidence heads)")
    out += backbone_refusals(cfg)
    if cfg.causal:
        out.append("its block attention is causal (DSpark blocks are bidirectional)")
    if cfg.shifted:
        out.append("its block is DFlash's shifted layout (DSpark's slot 0 already drafts)")
    return out


def export_dspark(head_dir, out_dir, lm=None, mask_token_id: int | None = None) -> Path:
    """Write the DSpark head at `head_dir` (trained for `lm`, default: its packaged target by name) into `out_dir`."""
    head, lm, cfg = load_for_export(head_dir, "DSpark", refusals, lm)
    if cfg.mask_token >= 0 and mask_token_id not in (None, cfg.mask_token):
        raise ValueError(f"--mask-token-id {mask_token_id}: the head was trained with mask token {cfg.mask_token}")
    mask = cfg.mask_token if cfg.mask_token >= 0 else cfg.vocab_size - 1 if mask_token_id is None else int(mask_token_id)
    if not 0 <= mask < cfg.vocab_size:
        raise ValueError(f"--mask-token-id {mask} is not a token id of the target (0..{cfg.vocab_size - 1})")
    tensors, config = to_dspark(head, lm.model.embed.weight.detach(), lm.model.lm_head.weight.detach(), mask,
                                lm.config.max_position)
    return write_checkpoint(out_dir, tensors, config, head_dir, "dspark", (
        f"Target layers (outputs) {list(cfg.tap_layers)}, block size {cfg.block_size}, mask token id {mask} "
        f"(its row of `embed_tokens` holds the head's mask embedding)."))
