"""The DSpark checkpoint layout (deepseek-ai DeepSpec `Qwen3DSparkModel`), both ways: a paratree DSpark
head as that checkpoint's tensors and config (`paratree export`), and a checkpoint directory in that
layout as a paratree head (`--head DIR`). Layout and forward: docs/export_formats_notes.md §2-§3.

The two are the same function when the paratree head has `tap_norm: false`, `root_in: false` and a
bidirectional block (`export.dspark` refuses other heads). Only the layout differs:
- the backbone as DFlash's (`dflash_format.py`: fused `wkv` / `w13` <-> k/v and gate/up projections);
- the learned mask embedding <-> row `mask_token_id` of the checkpoint's `embed_tokens` (a copy of the
  target's, which the format's block input reads);
- a reduced draft vocab <-> `lm_head` = the target's LM-head rows `d2t`, `d2t` stored as offsets
  (`target id = i + d2t[i]`);
- the confidence temperature T <-> folded into the confidence projection (w / T, b / T; T = 1 on import).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...models.config import CheckpointError
from .block import BlockHeadConfig
from .dflash_format import (backbone_config, backbone_head_config, backbone_state, backbone_tensors, has_architecture,
                            read_json, read_tensors)

ARCHITECTURES = ("Qwen3DSparkModel",)


def to_dspark(head, embed_w: torch.Tensor, lm_w: torch.Tensor, mask_token_id: int, max_position: int
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with HF names and no `model.` prefix, config.json) of `head`, in the head's dtype."""
    c = head.cfg
    sd = backbone_tensors(head)
    embed = embed_w.clone()
    if head.mask_emb is not None:  # else the head reads the target's row mask_token_id (== head.cfg.mask_token)
        embed[mask_token_id] = head.mask_emb.to(embed.dtype)
    t = head.conf_temperature
    sd.update({
        "embed_tokens.weight": embed, "lm_head.weight": head.lm_weight(lm_w),
        "markov_head.markov_w1.weight": head.markov_in.weight, "markov_head.markov_w2.weight": head.markov_out.weight,
        "confidence_head.proj.weight": head.conf.weight / t, "confidence_head.proj.bias": head.conf.bias / t,
    })
    out = {k: v.detach().contiguous() for k, v in sd.items()}
    if head.d2t is not None:
        out["d2t"] = (head.d2t - torch.arange(head.d2t.numel())).to(torch.int64)
    config = {
        "architectures": list(ARCHITECTURES), **backbone_config(head, max_position),
        "draft_vocab_size": c.draft_vocab or c.vocab_size, "is_causal": False,
        "target_layer_ids": list(c.tap_layers),  # outputs of these layers
        "mask_token_id": mask_token_id,
        "markov_rank": int(head.markov_in.weight.shape[1]), "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True,
    }
    return out, config


def is_dspark_dir(path: str | Path) -> bool:
    return has_architecture(path, ARCHITECTURES)


def read_dspark_config(path: str | Path) -> BlockHeadConfig:
    """The paratree head config of a DSpark checkpoint directory."""
    c = read_json(path, "DSpark")
    if c.get("markov_head_type", "vanilla") != "vanilla" or not c.get("confidence_head_with_markov", True):
        raise ValueError(f"'{path}': only a vanilla Markov head with a confidence head over [h ; w1[prev]] is a "
                         f"paratree DSpark head")
    try:
        vd = int(c.get("draft_vocab_size", c["vocab_size"]))
        return backbone_head_config(
            c, "dspark", tap_layers=tuple(c["target_layer_ids"]), block_size=c["block_size"],
            draft_vocab=vd if vd < c["vocab_size"] else 0,
            extra={"markov_rank": c["markov_rank"], "conf_temperature": 1.0, "mask_token_id": c["mask_token_id"]})
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: missing {e} (not a DSpark checkpoint paratree can read)"
                              ) from None


def read_dspark_state(path: str | Path, cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    """The paratree state dict of a DSpark checkpoint directory's `model.safetensors`."""
    f = Path(path) / "model.safetensors"
    sd = {k.removeprefix("model."): v for k, v in read_tensors(path, "DSpark").items()}
    try:
        out = backbone_state(sd, cfg)
        out.update({"mask_emb": sd["embed_tokens.weight"][cfg.extra["mask_token_id"]],
                    "markov_in.weight": sd["markov_head.markov_w1.weight"],
                    "markov_out.weight": sd["markov_head.markov_w2.weight"],
                    "conf.weight": sd["confidence_head.proj.weight"], "conf.bias": sd["confidence_head.proj.bias"]})
        if cfg.draft_vocab:
            out["d2t"] = sd["d2t"] + torch.arange(sd["d2t"].numel())
    except KeyError as e:
        raise CheckpointError(f"{f}: missing tensor {e} (not a DSpark checkpoint)") from None
    return out
