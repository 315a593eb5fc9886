"""The DSpark checkpoint layout (deepseek-ai DeepSpec `Qwen3DSparkModel`), both ways: a paratree DSpark
head as that checkpoint's tensors and config (`paratree export`), and a checkpoint directory in that
layout as a paratree head (`--head DIR`). Layout and forward: docs/export_formats_notes.md §2-§3.

The two are the same function when the paratree head has `tap_norm: false`, `root_in: false` and a
bidirectional block (`export.dspark` refuses other heads). Only the layout differs:
- fused `wkv` / `w13` <-> k/v and gate/up projections (rows [k; v]; gate first);
- the learned mask embedding <-> row `mask_token_id` of the checkpoint's `embed_tokens` (a copy of the
  target's, which the format's block input reads);
- a reduced draft vocab <-> `lm_head` = the target's LM-head rows `d2t`, `d2t` stored as offsets
  (`target id = i + d2t[i]`);
- the confidence temperature T <-> folded into the confidence projection (w / T, b / T; T = 1 on import).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...models.config import CheckpointError
from .block import BlockHeadConfig

ARCHITECTURES = ("Qwen3DSparkModel",)


def to_dspark(head, embed_w: torch.Tensor, lm_w: torch.Tensor, mask_token_id: int, max_position: int
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with HF names and no `model.` prefix, config.json) of `head`, in the head's dtype."""
    c = head.cfg
    kv = c.num_kv_heads * c.head_dim
    sd: dict[str, torch.Tensor] = {
        "fc.weight": head.fc.weight, "hidden_norm.weight": head.hidden_norm.weight, "norm.weight": head.norm.weight,
    }
    for i, layer in enumerate(head.layers):
        a, p = layer.attn, f"layers.{i}."
        k, v = a.wkv.weight.split(kv)  # rows [k; v]: HeadAttention.kv views them as (2, nkv, hd)
        gate, up = layer.mlp.w13.weight.split(layer.mlp.inter)  # MLP.forward: gate first
        sd.update({
            p + "input_layernorm.weight": layer.attn_norm.weight,
            p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            p + "self_attn.q_proj.weight": a.wq.weight, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": a.wo.weight,
            p + "self_attn.q_norm.weight": a.q_norm.weight, p + "self_attn.k_norm.weight": a.k_norm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": layer.mlp.w2.weight,
        })
    embed = embed_w.clone()
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
        "architectures": list(ARCHITECTURES), "model_type": "qwen3",
        "hidden_size": c.target_hidden, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_layers, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "max_position_embeddings": max_position, "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab or c.vocab_size, "tie_word_embeddings": False,
        "attention_bias": False, "is_causal": False, "layer_types": ["full_attention"] * c.num_layers,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        "num_target_layers": c.target_layers, "target_layer_ids": list(c.tap_layers),  # outputs of these layers
        "block_size": c.block_size, "mask_token_id": mask_token_id,
        "markov_rank": int(head.markov_in.weight.shape[1]), "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True,
        "paratree": {"target_name": c.target_name, "tokenizer_hash": c.tokenizer_hash},
    }
    return out, config


def is_dspark_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file() or (Path(path) / "head_config.json").is_file():
        return False
    try:
        return any(a in ARCHITECTURES for a in json.loads(f.read_text()).get("architectures", []))
    except ValueError:
        return False


def read_dspark_config(path: str | Path) -> BlockHeadConfig:
    """The paratree head config of a DSpark checkpoint directory."""
    f = Path(path) / "config.json"
    try:
        return _dspark_config(json.loads(f.read_text()), path)
    except KeyError as e:
        raise CheckpointError(f"{f}: missing {e} (not a DSpark checkpoint paratree can read)") from None


def _dspark_config(c: dict, path) -> BlockHeadConfig:
    if c.get("markov_head_type", "vanilla") != "vanilla" or not c.get("confidence_head_with_markov", True):
        raise ValueError(f"'{path}': only a vanilla Markov head with a confidence head over [h ; w1[prev]] is a "
                         f"paratree DSpark head")
    own = c.get("paratree", {})
    vd = int(c.get("draft_vocab_size", c["vocab_size"]))
    return BlockHeadConfig(
        family="dspark", causal=bool(c.get("is_causal", False)), target_hidden=c["hidden_size"],
        vocab_size=c["vocab_size"], target_layers=c["num_target_layers"], tap_layers=tuple(c["target_layer_ids"]),
        block_size=c["block_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], intermediate_size=c["intermediate_size"],
        rms_eps=c["rms_norm_eps"], rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta")),
        target_name=own.get("target_name", ""),
        tokenizer_hash=own.get("tokenizer_hash", ""), draft_vocab=vd if vd < c["vocab_size"] else 0,
        tap_norm=False, root_in=False,
        extra={"markov_rank": c["markov_rank"], "conf_temperature": 1.0, "mask_token_id": c["mask_token_id"]})


def read_dspark_state(path: str | Path, cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    """The paratree state dict of a DSpark checkpoint directory's `model.safetensors`."""
    f = Path(path) / "model.safetensors"
    try:
        return _dspark_state(load_file(str(f)), cfg)
    except (KeyError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{f}: cannot read a DSpark checkpoint ({type(e).__name__}: {e})") from None


def _dspark_state(sd: dict, cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out = {"fc.weight": sd["fc.weight"], "hidden_norm.weight": sd["hidden_norm.weight"], "norm.weight": sd["norm.weight"],
           "mask_emb": sd["embed_tokens.weight"][cfg.extra["mask_token_id"]],
           "markov_in.weight": sd["markov_head.markov_w1.weight"], "markov_out.weight": sd["markov_head.markov_w2.weight"],
           "conf.weight": sd["confidence_head.proj.weight"], "conf.bias": sd["confidence_head.proj.bias"]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"layers.{i}."
        out.update({
            q + "attn_norm.weight": sd[p + "input_layernorm.weight"], q + "mlp_norm.weight": sd[p + "post_attention_layernorm.weight"],
            q + "attn.wq.weight": sd[p + "self_attn.q_proj.weight"],
            q + "attn.wkv.weight": torch.cat([sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]]),
            q + "attn.wo.weight": sd[p + "self_attn.o_proj.weight"],
            q + "attn.q_norm.weight": sd[p + "self_attn.q_norm.weight"], q + "attn.k_norm.weight": sd[p + "self_attn.k_norm.weight"],
            q + "mlp.w13.weight": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            q + "mlp.w2.weight": sd[p + "mlp.down_proj.weight"],
        })
    if cfg.draft_vocab:
        out["d2t"] = sd["d2t"] + torch.arange(sd["d2t"].numel())
    return out
