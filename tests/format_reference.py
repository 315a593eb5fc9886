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


def _backbone(sd: dict, cfg: dict, taps: torch.Tensor, h: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The DFlash/DSpark backbone: context = hidden_norm(fc(cat(taps))) for positions 0..n-1; the block
    rows h (B, H) at positions n..n+B-1 attend to [context ; block] (bidirectionally, or block-causally)
    in every Qwen3-style layer, context K/V projected without input_layernorm. Returns norm(h_out)."""
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    ctx = _rms(taps.double() @ sd["fc.weight"].T, sd["hidden_norm.weight"], eps)
    n, bs = ctx.shape[0], h.shape[0]
    pc, pb = torch.arange(n), torch.arange(n, n + bs)
    allowed = torch.ones(bs, n + bs, dtype=torch.bool)
    if causal:
        allowed[:, n:] = torch.ones(bs, bs, dtype=torch.bool).tril()
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
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        att = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        h = h + torch.einsum("hqk,khd->qhd", att, v).reshape(bs, nh * hd) @ w["self_attn.o_proj.weight"].T
        y = _rms(h, w["post_attention_layernorm.weight"], eps)
        gate, up = y @ w["mlp.gate_proj.weight"].T, y @ w["mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return _rms(h, sd["norm.weight"], eps)


def _double(sd: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def dspark_block(sd: dict, cfg: dict, taps: torch.Tensor, anchor: int, prev: list[int]):
    """DSpark: the backbone over the block [anchor, mask, ...] (the checkpoint's own embed_tokens);
    logits_i = lm_head(h_i) + w2(w1[prev_i]), confidence_i = sigmoid(proj([h_i ; w1[prev_i]])).
    Slot 0 already drafts. Returns (logits over target ids (B, V) with -inf outside the draft vocab,
    confidence (B,))."""
    sd = _double(sd)
    bs = cfg["block_size"]
    out = _backbone(sd, cfg, taps, sd["embed_tokens.weight"][[anchor] + [cfg["mask_token_id"]] * (bs - 1)])
    code = sd["markov_head.markov_w1.weight"][prev]
    draft = out @ sd["lm_head.weight"].T + code @ sd["markov_head.markov_w2.weight"].T
    conf = torch.sigmoid(torch.cat([out, code], -1) @ sd["confidence_head.proj.weight"].T
                         + sd["confidence_head.proj.bias"]).squeeze(-1)
    vd = draft.shape[-1]
    ids = torch.arange(vd) + sd["d2t"] if "d2t" in sd else torch.arange(vd)
    logits = torch.full((bs, cfg["vocab_size"]), float("-inf"), dtype=torch.float64)
    logits[:, ids] = draft
    return logits, conf


def dflash_block(sd: dict, cfg: dict, taps: torch.Tensor, anchor: int, embed_w: torch.Tensor,
                 lm_w: torch.Tensor) -> torch.Tensor:
    """DFlash (z-lab): the backbone over [anchor, mask x (B-1)] embedded by the TARGET's embedding,
    block-causal iff dflash_config.causal; slot 0 is discarded, slot i >= 1 predicts the token at its
    own position through the target's LM head. Returns logits (B-1, V)."""
    d = cfg["dflash_config"]
    bs = d["block_size"]
    h = embed_w.double()[[anchor] + [d["mask_token_id"]] * (bs - 1)]
    out = _backbone(_double(sd), cfg, taps, h, causal=d.get("causal", False))
    return out[1:] @ lm_w.double().T


def eagle3_chain(sd: dict, cfg: dict, taps: torch.Tensor, tokens: list[int], embed_w: torch.Tensor, depth: int):
    """EAGLE-3 (SpecForge / vLLM / llama.cpp eagle3.cpp): committed tokens x_0..x_n (x_n the root),
    taps (n, 3H) of positions 0..n-1. State t reads (x_{t+1}, g_t = fc(taps_t)) at RoPE position t:
    x = [input_layernorm(emb) ; hidden_norm(g)], h = g + o(attn(x)), h += mlp(post_norm(h)),
    causal over the states; logits = lm_head(norm(h)) over the draft vocab, target id = i + d2t[i].
    The last state drafts token 1 (greedy); step j >= 2 reads (token j-1, the PRE-norm h of step
    j-1) at the next position. Returns (drafted target ids, their log-probs)."""
    sd = _double(sd)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = {k.removeprefix("midlayer."): v for k, v in sd.items()}
    emb = embed_w.double()
    to_target = torch.arange(cfg["draft_vocab_size"]) + sd["d2t"]
    keys, vals = [], []

    def step(tok: int, g: torch.Tensor, pos: int) -> torch.Tensor:
        x = torch.cat([_rms(emb[tok], w["input_layernorm.weight"], eps), _rms(g, w["hidden_norm.weight"], eps)])
        p = torch.tensor([pos])
        q = _rope((x @ w["self_attn.q_proj.weight"].T).view(1, nh, hd), p, theta)[0]
        keys.append(_rope((x @ w["self_attn.k_proj.weight"].T).view(1, nkv, hd), p, theta)[0])
        vals.append((x @ w["self_attn.v_proj.weight"].T).view(nkv, hd))
        k = torch.stack(keys).repeat_interleave(nh // nkv, 1)  # (S, nh, hd)
        v = torch.stack(vals).repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("hd,shd->hs", q, k) / hd ** 0.5, -1)
        h = g + torch.einsum("hs,shd->hd", att, v).reshape(nh * hd) @ w["self_attn.o_proj.weight"].T
        y = _rms(h, w["post_attention_layernorm.weight"], eps)
        return h + (torch.nn.functional.silu(y @ w["mlp.gate_proj.weight"].T) * (y @ w["mlp.up_proj.weight"].T)) \
            @ w["mlp.down_proj.weight"].T

    g = taps.double() @ sd["fc.weight"].T
    n = g.shape[0]
    for t in range(n):  # the committed states: (x_{t+1}, g_t) at position t
        h = step(tokens[t + 1], g[t], t)
    out, logps = [], []
    for j in range(depth):
        logp = torch.log_softmax(_rms(h, sd["norm.weight"], eps) @ sd["lm_head.weight"].T, -1)
        i = int(logp.argmax())
        out.append(int(to_target[i]))
        logps.append(float(logp[i]))
        if j + 1 < depth:
            h = step(out[-1], h, n + j)
    return out, logps
