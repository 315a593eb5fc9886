"""Reference forwards of the draft-head checkpoint formats, written from their definitions
(docs/export_formats_notes.md, which cites DeepSpec, z-lab/dflash and llama.cpp), in fp64 and
plain tensor algebra: no paratree code, so an export that changed the function shows up here."""

from __future__ import annotations

import torch


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):  # NEOX layout: rotate the two halves of each head
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    f = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dspark_block(sd: dict, cfg: dict, taps: torch.Tensor, anchor: int, prev: list[int]):
    """DSpark: context = hidden_norm(fc(cat(taps))) for positions 0..n-1; block [anchor, mask, ...] at
    positions n..n+B-1 attends (bidirectionally) to [context ; block] in every Qwen3-style layer,
    context K/V projected without input_layernorm; logits_i = lm_head(norm(h_i)) + w2(w1[prev_i]),
    confidence_i = sigmoid(proj([norm(h_i) ; w1[prev_i]])). Returns (logits over target ids (B, V)
    with -inf outside the draft vocab, confidence (B,))."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    nh, nkv, hd, bs = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["block_size"]
    ctx = _rms(taps.double() @ sd["fc.weight"].T, sd["hidden_norm.weight"], eps)
    n = ctx.shape[0]
    h = sd["embed_tokens.weight"][[anchor] + [cfg["mask_token_id"]] * (bs - 1)]
    pc, pb = torch.arange(n), torch.arange(n, n + bs)
    for i in range(cfg["num_hidden_layers"]):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}

        def keys(x, pos):
            k = _rms((x @ w["self_attn.k_proj.weight"].T).view(len(x), nkv, hd), w["self_attn.k_norm.weight"], eps)
            return _rope(k, pos, theta), (x @ w["self_attn.v_proj.weight"].T).view(len(x), nkv, hd)

        x = _rms(h, w["input_layernorm.weight"], eps)
        q = _rope(_rms((x @ w["self_attn.q_proj.weight"].T).view(bs, nh, hd), w["self_attn.q_norm.weight"], eps),
                  pb, theta)
        (kc, vc), (kb, vb) = keys(ctx, pc), keys(x, pb)
        k, v = torch.cat([kc, kb]).repeat_interleave(nh // nkv, 1), torch.cat([vc, vb]).repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5, -1)
        h = h + torch.einsum("hqk,khd->qhd", att, v).reshape(bs, nh * hd) @ w["self_attn.o_proj.weight"].T
        y = _rms(h, w["post_attention_layernorm.weight"], eps)
        gate, up = y @ w["mlp.gate_proj.weight"].T, y @ w["mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    out = _rms(h, sd["norm.weight"], eps)
    code = sd["markov_head.markov_w1.weight"][prev]
    draft = out @ sd["lm_head.weight"].T + code @ sd["markov_head.markov_w2.weight"].T
    conf = torch.sigmoid(torch.cat([out, code], -1) @ sd["confidence_head.proj.weight"].T
                         + sd["confidence_head.proj.bias"]).squeeze(-1)
    vd = draft.shape[-1]
    ids = torch.arange(vd) + sd["d2t"] if "d2t" in sd else torch.arange(vd)
    logits = torch.full((bs, cfg["vocab_size"]), float("-inf"), dtype=torch.float64)
    logits[:, ids] = draft
    return logits, conf
