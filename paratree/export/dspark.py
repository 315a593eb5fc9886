"""DSpark checkpoint format (deepseek-ai DeepSpec `Qwen3DSparkModel`; llama.cpp converts it to its
`dflash` arch with `markov_w1`, run as `--spec-type draft-dspark`). Layout and forward:
docs/export_formats_notes.md §2-§3, read from DeepSpec, z-lab/dflash and llama.cpp's converter.

paratree's DSpark head is that function when it was trained with `tap_norm: false` and
`root_in: false`: `hidden_norm(fc(cat(taps)))` context features, Qwen3-style layers (q/k norms,
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

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..drafters.heads.block import BlockDraftHead
from ..drafters.registry import head_family_of
from ..models.loader import load_model


def _refusals(cfg) -> list[str]:
    out = []
    if cfg.family != "dspark":
        out.append(f"it is a {cfg.family} head (the format needs a DSpark head: Markov + confidence heads)")
    if cfg.tap_norm:
        out.append("it RMS-normalises each tap before fc (train with tap_norm: false)")
    if cfg.root_in:
        out.append("its root row mixes the root's embedding with the state before it (train with root_in: false)")
    if cfg.causal:
        out.append("its block attention is causal (DSpark blocks are bidirectional)")
    return out


def dspark_tensors(head, embed_w: torch.Tensor, lm_w: torch.Tensor, mask_token_id: int) -> dict[str, torch.Tensor]:
    """The DSpark checkpoint's tensors (HF names, no `model.` prefix) for `head`, in its dtype."""
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
        "embed_tokens.weight": embed,
        "lm_head.weight": head.lm_weight(lm_w),
        "markov_head.markov_w1.weight": head.markov_in.weight,
        "markov_head.markov_w2.weight": head.markov_out.weight,
        "confidence_head.proj.weight": head.conf.weight / t,
        "confidence_head.proj.bias": head.conf.bias / t,
    })
    out = {k: v.detach().contiguous() for k, v in sd.items()}
    if head.d2t is not None:
        out["d2t"] = (head.d2t - torch.arange(head.d2t.numel())).to(torch.int64)
    return out


def dspark_config(head, target_cfg, mask_token_id: int) -> dict:
    c = head.cfg
    return {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3",
        "hidden_size": c.target_hidden, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_layers, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "max_position_embeddings": target_cfg.max_position, "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab or c.vocab_size, "tie_word_embeddings": False,
        "attention_bias": False, "is_causal": False, "layer_types": ["full_attention"] * c.num_layers,
        "torch_dtype": "float32",
        "num_target_layers": c.target_layers, "target_layer_ids": list(c.tap_layers),  # outputs of these layers
        "block_size": c.block_size, "mask_token_id": mask_token_id,
        "markov_rank": int(head.markov_in.weight.shape[1]), "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True,
    }


def export_dspark(head_dir, out_dir, lm=None, mask_token_id: int | None = None) -> Path:
    """Write the DSpark head at `head_dir` (trained for `lm`, default: its packaged target by name) into `out_dir`."""
    cfg = BlockDraftHead.read_config(head_dir)
    why = _refusals(cfg)
    if why:
        raise ValueError(f"'{head_dir}' cannot be written as DSpark without changing its function: " + "; ".join(why))
    head = head_family_of("dspark").load_head(head_dir, dtype=torch.float32)
    lm = lm if lm is not None else load_model(cfg.target_name or None, "fp32", tokenizer=False)
    head.check_target(lm.config)
    mask = cfg.vocab_size - 1 if mask_token_id is None else int(mask_token_id)
    if not 0 <= mask < cfg.vocab_size:
        raise ValueError(f"--mask-token-id {mask} is not a token id of the target (0..{cfg.vocab_size - 1})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dspark_tensors(head, lm.model.embed.weight.detach(), lm.model.lm_head.weight.detach(), mask)
    save_file(tensors, str(out / "model.safetensors"))  # fp32: the target's rows are copied without rounding
    (out / "config.json").write_text(json.dumps(dspark_config(head, lm.config, mask), indent=2))
    (out / "README.md").write_text(
        f"# DSpark draft head for {cfg.target_name}\n\nExported by `paratree export {head_dir} --format dspark`. "
        f"Target layers (outputs) {list(cfg.tap_layers)}, block size {cfg.block_size}, mask token id {mask} "
        f"(its row of `embed_tokens` holds the head's learned mask embedding).\n")
    return out
