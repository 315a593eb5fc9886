"""DFlash checkpoint format (z-lab `DFlashDraftModel`; llama.cpp converts it to its `dflash` arch, run
as `--spec-type draft-dflash`; vLLM/SGLang method "dflash"). Layout and forward:
docs/export_formats_notes.md §2; the layout mapping is `drafters/heads/dflash_format.py`.

A DFlash (bidirectional) or JetSpec (block-causal, `dflash_config.causal: true`) head is that
function when it was trained with `tap_norm: false`, `root_in: false`, `shifted: true`, a
`mask_token` and no `draft_vocab` (configs/dflash_export_smollm2.yaml): the format has no learned
mask, no root projection, no anchor-first rows and no reduced vocabulary (llama.cpp's plain DFlash
converter cannot map a `d2t`).
"""

from __future__ import annotations

from pathlib import Path

from ..drafters.heads.dflash_format import to_dflash
from .common import backbone_refusals, load_for_export, write_checkpoint


def refusals(cfg) -> list[str]:
    out = []
    if cfg.family not in ("dflash", "jetspec"):
        out.append(f"it is a {cfg.family} head (the format holds a DFlash or JetSpec block head)")
    out += backbone_refusals(cfg)
    if not cfg.shifted:
        out.append("its row i predicts the token after position n+i; DFlash's slot i predicts the token at n+i "
                   "(train with shifted: true)")
    if cfg.mask_token < 0:
        out.append("its mask embedding is learned; the format feeds the target's embedding of mask_token_id "
                   "(train with mask_token: ID)")
    if cfg.draft_vocab:
        out.append(f"it predicts over a {cfg.draft_vocab}-token draft vocabulary; DFlash uses the target's full LM "
                   f"head (train without draft_vocab)")
    return out


def export_dflash(head_dir, out_dir, lm=None, mask_token_id: int | None = None) -> Path:
    """Write the block head at `head_dir` (trained for `lm`) into `out_dir` as a DFlash checkpoint."""
    head, lm, cfg = load_for_export(head_dir, "DFlash", refusals, lm)
    if mask_token_id not in (None, cfg.mask_token):
        raise ValueError(f"--mask-token-id {mask_token_id}: the head was trained with mask token {cfg.mask_token}")
    tensors, config = to_dflash(head, lm.config.max_position)
    return write_checkpoint(out_dir, tensors, config, head_dir, "dflash", (
        f"Target layers (outputs) {list(cfg.tap_layers)}, block size {cfg.block_size} ({cfg.depth} drafts per pass), "
        f"{'block-causal' if cfg.causal else 'bidirectional'} block, mask token id {cfg.mask_token}; the target's "
        f"embedding and LM head are used."))
