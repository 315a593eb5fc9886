"""The DFlash checkpoint layout (z-lab `DFlashDraftModel`; llama.cpp converts it to its `dflash` arch,
run as `--spec-type draft-dflash`), both ways, and the Qwen3-style backbone it shares with DSpark
(`dspark_format.py` adds the Markov and confidence heads). Layout and forward:
docs/export_formats_notes.md §2, read from z-lab/dflash `dflash/model.py` and llama.cpp's converter
(`conversion/qwen.py` DFlashModel) and loader (`src/models/dflash.cpp`).

A paratree block head is that function when it was trained with `tap_norm: false`, `root_in: false`,
`shifted: true`, a `mask_token` and the full vocabulary (no `draft_vocab`): context features
`hidden_norm(fc(cat(taps)))`, a block [anchor, mask, ...] whose slot i >= 1 predicts the token at its
own position, the target's embedding and LM head. What differs only in layout is rewritten exactly:
fused `wkv` / `w13` <-> k/v and gate/up projections (rows [k; v]; gate first).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...models.config import CheckpointError
from .block import BlockHeadConfig

ARCHITECTURES = ("DFlashDraftModel",)


def backbone_tensors(head) -> dict[str, torch.Tensor]:
    """The backbone's tensors with HF names (no `model.` prefix): fc, norms and the Qwen3-style layers."""
    c = head.cfg
    kv = c.num_kv_heads * c.head_dim
    sd = {"fc.weight": head.fc.weight, "hidden_norm.weight": head.hidden_norm.weight, "norm.weight": head.norm.weight}
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
    return sd


def backbone_config(head, max_position: int) -> dict:
    """The Qwen3Config keys the DFlash and DSpark loaders read for the backbone."""
    c = head.cfg
    return {
        "model_type": "qwen3", "hidden_size": c.target_hidden, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_layers, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "max_position_embeddings": max_position, "vocab_size": c.vocab_size,
        "tie_word_embeddings": False, "attention_bias": False, "is_causal": bool(c.causal),
        "layer_types": ["full_attention"] * c.num_layers,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."), "num_target_layers": c.target_layers,
        "block_size": c.block_size,
        "paratree": {"target_name": c.target_name, "tokenizer_hash": c.tokenizer_hash},
    }


def backbone_state(sd: dict[str, torch.Tensor], cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    """paratree's backbone state dict from a checkpoint's tensors (a `model.` prefix is dropped)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out = {"fc.weight": sd["fc.weight"], "hidden_norm.weight": sd["hidden_norm.weight"], "norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out.update({
            p + "attn_norm.weight": sd[p + "input_layernorm.weight"],
            p + "mlp_norm.weight": sd[p + "post_attention_layernorm.weight"],
            p + "attn.wq.weight": sd[p + "self_attn.q_proj.weight"],
            p + "attn.wkv.weight": torch.cat([sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]]),
            p + "attn.wo.weight": sd[p + "self_attn.o_proj.weight"],
            p + "attn.q_norm.weight": sd[p + "self_attn.q_norm.weight"],
            p + "attn.k_norm.weight": sd[p + "self_attn.k_norm.weight"],
            p + "mlp.w13.weight": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            p + "mlp.w2.weight": sd[p + "mlp.down_proj.weight"],
        })
    return out


def backbone_head_config(c: dict, family: str, **kw) -> BlockHeadConfig:
    """paratree's head config for a checkpoint's backbone keys (`kw`: what the format adds)."""
    own = c.get("paratree", {})
    return BlockHeadConfig(
        family=family, causal=bool(c.get("is_causal") or False), target_hidden=c["hidden_size"],
        vocab_size=c["vocab_size"], target_layers=c["num_target_layers"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        intermediate_size=c["intermediate_size"], rms_eps=c["rms_norm_eps"],
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta")),
        target_name=own.get("target_name", ""), tokenizer_hash=own.get("tokenizer_hash", ""),
        tap_norm=False, root_in=False, **kw)


def read_json(path: str | Path, what: str) -> dict:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read a {what} config ({e})") from None


def read_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    f = Path(path) / "model.safetensors"
    try:
        return load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{f}: cannot read a {what} checkpoint ({type(e).__name__}: {e})") from None


def has_architecture(path: str | Path, names: tuple[str, ...]) -> bool:
    """A foreign checkpoint directory (config.json, no paratree head_config.json) of one of `names`."""
    f = Path(path) / "config.json"
    if not f.is_file() or (Path(path) / "head_config.json").is_file():
        return False
    try:
        return any(a in names for a in json.loads(f.read_text()).get("architectures", []))
    except ValueError:
        return False


# -- DFlash itself ----------------------------------------------------------------------------
def to_dflash(head, max_position: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) of an exportable block head (see the module docstring)."""
    c = head.cfg
    config = {"architectures": list(ARCHITECTURES), **backbone_config(head, max_position),
              "dflash_config": {"target_layer_ids": list(c.tap_layers),  # outputs of these target layers
                                "mask_token_id": c.mask_token, "block_size": c.block_size, "causal": bool(c.causal)}}
    return {k: v.detach().contiguous() for k, v in backbone_tensors(head).items()}, config


def is_dflash_dir(path: str | Path) -> bool:
    return has_architecture(path, ARCHITECTURES)


def read_dflash_config(path: str | Path) -> BlockHeadConfig:
    """The paratree head config of a DFlash checkpoint: a causal block is JetSpec's head, else DFlash's."""
    c = read_json(path, "DFlash")
    try:
        d = {**c, **c.get("dflash_config", {})}  # z-lab reads these keys from dflash_config, else top level
        causal = bool(d.get("causal", c.get("is_causal")) or False)
        cfg = backbone_head_config(c, "jetspec" if causal else "dflash", tap_layers=tuple(d["target_layer_ids"]),
                                   block_size=int(d.get("block_size", 16)), shifted=True,
                                   mask_token=int(d["mask_token_id"]))
        cfg.causal = causal
        return cfg
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: missing {e} (not a DFlash checkpoint paratree can read)"
                              ) from None


def read_dflash_state(path: str | Path, cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    try:
        return backbone_state(read_tensors(path, "DFlash"), cfg)
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / 'model.safetensors'}: missing tensor {e} (not a DFlash checkpoint)"
                              ) from None
