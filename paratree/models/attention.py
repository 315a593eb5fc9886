"""Attention whose every query row is bit-identical to plain decoding of that token (the exact runtime).

Why: SDPA picks its blocking from the query and key counts, so a tree node and the same token
decoded alone round differently, and a near-tie then flips a greedy token. Here a row's numbers
do not depend on how many other rows, sequences or stale cache slots the call carries:
- keys are taken in blocks of KEY_CHUNK at fixed *logical* positions (multiples of 64 from the
  sequence's first token); a block's row sum runs over its 64 positions, and blocks are added
  in logical order by a sequential scan (`cumsum`). Blocks a row cannot see add exact zeros;
- every GEMM reduces over one head dim (scores) or one 64-key block (values) and has at least
  2 rows (BLAS runs a 1-row product as a GEMV, with another summation order), so a product does
  not depend on the shape of the call it sits in;
- a row's keys sit in the cache in logical order up to its first branch. From the last block
  boundary before that (its `split`), they are gathered into logical order (the `tail`).

The per-row layout is an `AttentionPlan`. It is built once per forward, outside any compiled graph,
from the visibility mask. Every layer shares it, and a compiled graph takes it as tensors, so one
graph serves every tree size and context length (models/compiled.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KEY_CHUNK = 64  # keys per block


@dataclass
class AttentionPlan:
    """Which keys each of the B x T query rows sees, as blocks of KEY_CHUNK logical positions.

    common_ok (B, T, nc, C): the row sees cache slot j of [0, nc*C), and j lies before the row's split
    (there slot = logical position). tail_src (B, T, nct, C): the row's keys from its split on, in
    logical order, as indices into its key source (the cache, or with a `window`: those cache slots
    then the forward's new tokens); tail_ok marks the real ones."""

    common_ok: torch.Tensor
    tail_src: torch.Tensor
    tail_ok: torch.Tensor
    window: torch.Tensor | None = None  # (C,) cache slots read before the new tokens (see plan_attention)


def plan_attention(vis: torch.Tensor, limit: int, new_at: tuple[int, int] | None = None,
                   min_blocks: int = 0) -> AttentionPlan:
    """The plan for visibility `vis` (B, T, L) bool over cache slots [0, L).

    limit: the common region may cover only cache slots [0, limit) (those holding keys when the
    attention reads them). new_at=(start, M): slots >= start are the forward's new tokens, not yet in
    the cache M slots long (a compiled graph reads them from its own outputs). Then every row's tail
    must start at one block boundary F with slots [F, start) before its new tokens (one sequence whose
    rows all see its whole prefix), and the tail indexes window = cache slots [F, F + C), then the new
    tokens; None if a row's tail does not fit that. min_blocks:
    at least this many common and tail blocks (a compiled graph never sees a block count of 0 or 1,
    which it would specialise on); padding blocks are masked."""
    b, t, n = vis.shape
    c = KEY_CHUNK
    run = vis.int().cumprod(-1).sum(-1)  # leading run of visible slots: there slot = logical position
    prefix = run == vis.sum(-1)  # the row sees exactly slots [0, run): no tail needed
    split = torch.where(prefix, (run + c - 1) // c * c, run // c * c).clamp(max=limit // c * c)
    nc = max(min_blocks, int(split.max()) // c)
    slot = torch.arange(n)
    vis_c = vis[..., :nc * c] if nc * c <= n else F.pad(vis, (0, nc * c - n))
    common_ok = vis_c & (torch.arange(nc * c) < split[..., None])
    tail = vis & (slot >= split[..., None])
    n_tail = tail.sum(-1)
    nct = max(min_blocks, -(-int(n_tail.max()) // c))
    w, lo = nct * c, int(split.min())
    # each row's tail slots in ascending order (= logical order: a tree's parents precede children)
    order = torch.sort((~tail[..., lo:]).to(torch.int8), dim=-1, stable=True).indices + lo
    order = F.pad(order, (0, max(0, w - order.shape[-1])))[..., :w]
    tail_ok = torch.arange(w) < n_tail[..., None]
    window = None
    if new_at is not None:
        start, m = new_at
        if bool(((order < lo) | ((order >= lo + c) & (order < start)))[tail_ok].any()):
            return None
        order = torch.where(order >= start, order - start + c, order - lo)
        window = (torch.arange(c) + lo).clamp(max=m - 1)
    tail_src = torch.where(tail_ok, order, 0)  # padding reads slot 0 (finite; weighted by an exact 0)
    return AttentionPlan(common_ok.view(b, t, nc, c), tail_src.view(b, t, nct, c), tail_ok.view(b, t, nct, c), window)


def visibility(mask: torch.Tensor | None, b: int, t: int, n: int) -> torch.Tensor:
    """A forward's (B, 1, T, n) bool mask (None = all visible) as (B, T, n)."""
    return torch.ones(b, t, n, dtype=torch.bool) if mask is None else mask.expand(b, 1, t, n)[:, 0]


def _gather(cache: torch.Tensor, new: torch.Tensor | None, src: torch.Tensor, window: torch.Tensor | None
            ) -> torch.Tensor:
    """(B, nkv, T, W, hd) fp32: the key/value rows at src (B, T, W) of `cache` (B, nkv, M, hd), or with a
    `window`, of [cache slots `window` ; `new` (B, nkv, T', hd)]. Whole rows are copied (vectorised)."""
    if window is not None:
        cache = torch.cat([cache[:, :, window], new.to(cache.dtype)], 2)
    bi = torch.arange(cache.shape[0]).view(-1, 1, 1)
    return cache[bi, :, src].permute(0, 3, 1, 2, 4).float()  # (B, T, W, nkv, hd) -> (B, nkv, T, W, hd)


def exact_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention in fp32 of q (B, nh, T, hd) over the keys `plan` gives each row.

    k_cache, v_cache: (B, nkv, M, hd), M >= nc*C; k_new, v_new (B, nkv, T, hd): the forward's own keys
    where they are not in the cache yet (`plan_attention(new_at=...)`). Returns (B, nh, T, hd) fp32."""
    b, nh, t, hd = q.shape
    nkv, c = k_cache.shape[1], KEY_CHUNK
    g = nh // nkv
    nc, nct = plan.common_ok.shape[2], plan.tail_ok.shape[2]
    scale = hd ** -0.5
    qf = q.float().view(b, nkv, g, t, hd)
    scores, ok = [], []
    if nc:  # one GEMM per (sequence, kv head): every row against the common region's keys
        rows = qf.reshape(b, nkv, g * t, hd)
        if g * t < 2:
            rows = F.pad(rows, (0, 0, 0, 1))
        kc = k_cache[:, :, :nc * c].float()
        s = torch.matmul(rows, kc.transpose(-1, -2))[:, :, :g * t] * scale
        scores.append(s.view(b, nkv, g, t, nc, c))
        ok.append(plan.common_ok.view(b, 1, 1, t, nc, c))
    if nct:  # one GEMM per (sequence, kv head, row): the row's g heads against its own gathered keys
        kt = _gather(k_cache, k_new, plan.tail_src.view(b, t, nct * c), plan.window)  # (b, nkv, t, W, hd)
        rows = qf.permute(0, 1, 3, 2, 4)  # (b, nkv, t, g, hd)
        if g < 2:
            rows = F.pad(rows, (0, 0, 0, 1))
        st = torch.matmul(rows, kt.transpose(-1, -2))[..., :g, :] * scale  # (b, nkv, t, g, W)
        scores.append(st.view(b, nkv, t, g, nct, c).permute(0, 1, 3, 2, 4, 5))
        ok.append(plan.tail_ok.view(b, 1, 1, t, nct, c))
    scores = [s.masked_fill(~m, float("-inf")) for s, m in zip(scores, ok)]
    mx = scores[0].amax(dim=(-2, -1), keepdim=True)
    for s in scores[1:]:
        mx = torch.maximum(mx, s.amax(dim=(-2, -1), keepdim=True))
    mx = mx.clamp_min(torch.finfo(torch.float32).min)  # a row may see nothing in one part
    probs = [torch.exp(s - mx) for s in scores]  # (b, nkv, g, t, blocks, C)
    sums = torch.cat([p.sum(-1) for p in probs], -1)  # (b, nkv, g, t, nc + nct)
    outs = []
    if nc:  # per block: (g*t rows) x (64 keys) @ (64 keys) x hd
        vc = v_cache[:, :, :nc * c].float().view(b, nkv, nc, c, hd)
        p = probs[0].permute(0, 1, 4, 2, 3, 5).reshape(b, nkv, nc, g * t, c)
        if g * t < 2:
            p = F.pad(p, (0, 0, 0, 1))
        outs.append(torch.matmul(p, vc)[..., :g * t, :].view(b, nkv, nc, g, t, hd))
    if nct:  # per row and block: (g rows) x (64 keys) @ its gathered values
        vt = _gather(v_cache, v_new, plan.tail_src.view(b, t, nct * c), plan.window).view(b, nkv, t, nct, c, hd)
        p = probs[-1].permute(0, 1, 3, 4, 2, 5)  # (b, nkv, t, nct, g, C)
        if g < 2:
            p = F.pad(p, (0, 0, 0, 1))
        ot = torch.matmul(p, vt)[..., :g, :]  # (b, nkv, t, nct, g, hd)
        outs.append(ot.permute(0, 1, 3, 4, 2, 5))
    o = torch.cat(outs, 2)  # (b, nkv, blocks, g, t, hd), blocks in logical order
    total = sums.cumsum(-1)[..., -1]  # (b, nkv, g, t): a sequential scan adds the blocks in order
    out = o.cumsum(2)[:, :, -1] / total[..., None]
    return out.reshape(b, nh, t, hd)


def row_invariant_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """`exact_attention` of q (B, nh, T, hd) over keys/vals (B, nkv, L, hd) under mask (B, 1, T, L) bool
    (None = all visible): every row equals that token decoded alone over only the keys it sees."""
    b, _, t, _ = q.shape
    plan = plan_attention(visibility(mask, b, t, keys.shape[2]), keys.shape[2])
    return exact_attention(q, keys, vals, plan)
