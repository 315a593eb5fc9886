"""The EAGLE-3 checkpoint layout (SpecForge `LlamaForCausalLMEagle3`, read by vLLM as
`Eagle3LlamaForCausalLM`, by SGLang and by llama.cpp's converter), both ways. Layout:
docs/export_formats_notes.md §1.1. Only the layout differs from `Eagle3Head`:
- the fused `w13` <-> `mlp.gate_proj` / `mlp.up_proj` (gate first);
- `d2t` <-> offsets (`target id = i + d2t[i]`), plus the `t2d` mask the engines ignore;
- tap layers (outputs of layer i) <-> `eagle_aux_hidden_state_layer_ids` (inputs of layer i + 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...models.config import CheckpointError
from .block import BlockHeadConfig
from .dflash_format import has_architecture, read_json, read_tensors

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
_NAMES = {  # paratree name -> checkpoint name
    "fc.weight": "fc.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
    "input_layernorm.weight": "midlayer.input_layernorm.weight", "hidden_norm.weight": "midlayer.hidden_norm.weight",
    **{f"layers.0.{p}_proj.weight": f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"},
    "layers.0.post_attention_layernorm.weight": "midlayer.post_attention_layernorm.weight",
    "layers.0.mlp.w2.weight": "midlayer.mlp.down_proj.weight",
}


def to_eagle3(head, max_position: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) of an `Eagle3Head`."""
    c = head.cfg
    sd = head.state_dict()
    out = {ckpt: sd[ours] for ours, ckpt in _NAMES.items()}
    out["midlayer.mlp.gate_proj.weight"], out["midlayer.mlp.up_proj.weight"] = sd["layers.0.mlp.w13.weight"].split(
        c.intermediate_size)
    v, vd = c.vocab_size, c.draft_vocab or c.vocab_size
    d2t = head.d2t if head.d2t is not None else torch.arange(v)
    out["d2t"] = (d2t - torch.arange(vd)).to(torch.int64)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[d2t] = True
    out["t2d"] = t2d
    aux = [t + 1 for t in c.tap_layers]  # EAGLE-3 ids name the layer whose INPUT is captured
    config = {
        "architectures": [ARCHITECTURES[0]], "model_type": "llama", "hidden_size": c.target_hidden,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta, "max_position_embeddings": max_position,
        "hidden_act": "silu", "vocab_size": v, "draft_vocab_size": vd, "target_hidden_size": c.target_hidden,
        "tie_word_embeddings": False, "attention_bias": False, "norm_before_residual": False,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": aux,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": aux},
        "num_target_layers": c.target_layers, "ttt_steps": c.block_size,
        "paratree": {"target_name": c.target_name, "tokenizer_hash": c.tokenizer_hash},
    }
    return {k: t.detach().contiguous() for k, t in out.items()}, config


def is_eagle3_dir(path: str | Path) -> bool:
    return has_architecture(path, ARCHITECTURES)


def read_eagle3_config(path: str | Path) -> BlockHeadConfig:
    c = read_json(path, "EAGLE-3")
    f = Path(path) / "config.json"
    if c.get("norm_before_residual") or c.get("norm_before_fc") or c.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{f}: only a one-layer EAGLE-3 head without norm_before_residual / norm_before_fc is "
                         f"a paratree EAGLE-3 head")
    try:
        aux = c.get("eagle_aux_hidden_state_layer_ids") or (c.get("eagle_config") or {})[
            "eagle_aux_hidden_state_layer_ids"]
        if len(aux) != 3 or c.get("target_hidden_size", c["hidden_size"]) != c["hidden_size"]:
            raise ValueError(f"{f}: paratree reads EAGLE-3 heads with 3 aux layers and the target's hidden size")
        own, vd = c.get("paratree", {}), int(c["draft_vocab_size"])
        return BlockHeadConfig(
            family="eagle3", causal=True, target_hidden=c["hidden_size"], vocab_size=c["vocab_size"],
            target_layers=int(c.get("num_target_layers", 0)), tap_layers=tuple(a - 1 for a in aux),
            block_size=int(c.get("ttt_steps", 7)), num_layers=1, num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            intermediate_size=c["intermediate_size"], rms_eps=c["rms_norm_eps"], rope_theta=c.get("rope_theta", 1e4),
            target_name=own.get("target_name", ""), tokenizer_hash=own.get("tokenizer_hash", ""),
            draft_vocab=vd if vd < c["vocab_size"] else 0, tap_norm=False, root_in=False)
    except KeyError as e:
        raise CheckpointError(f"{f}: missing {e} (not an EAGLE-3 checkpoint paratree can read)") from None


def read_eagle3_state(path: str | Path, cfg: BlockHeadConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model.").replace("layers.0.", "midlayer."): v
          for k, v in read_tensors(path, "EAGLE-3").items()}
    try:
        out = {ours: sd[ckpt] for ours, ckpt in _NAMES.items()}
        out["layers.0.mlp.w13.weight"] = torch.cat([sd["midlayer.mlp.gate_proj.weight"],
                                                    sd["midlayer.mlp.up_proj.weight"]])
        if cfg.draft_vocab:
            out["d2t"] = sd["d2t"] + torch.arange(sd["d2t"].numel())
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / 'model.safetensors'}: missing tensor {e} (not an EAGLE-3 checkpoint)"
                              ) from None
    return out
