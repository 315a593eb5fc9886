"""A compact Llama / Qwen2 / Qwen3 decoder forward (gpt-fast style).

One forward serves prefill, plain decoding and tree verification: the caller
gives token ids, their RoPE positions, the cache slot where their K/V go, and a
boolean visibility mask over cache slots. Projections are fused (qkv, gate|up)
because on a CPU the per-op overhead of a 135M model is a large share of a
decode step.
"""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionPlan, exact_attention, plan_attention, visibility
from .config import ModelConfig
from .kernels import KernelRoute, fp32_route


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; low-precision inputs are normalised in fp32 inside it. Under autocast
        # (head training: bf16 activations, fp32 weights) the weight is cast to the input's dtype,
        # else torch falls back to its slow unfused path (the grad still reaches the fp32 weight).
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        out = (self.nh + 2 * self.nkv) * self.hd
        self.wqkv = nn.Linear(cfg.hidden_size, out, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_eps) if cfg.qk_norm else None

    def project(self, x, cos, sin):
        """q (B, nh, T, hd) and k, v (B, nkv, T, hd) for `x`, RoPE applied (norms first for Qwen3)."""
        b, t, _ = x.shape
        qkv = self.wqkv(x)
        nq = self.nh + self.nkv
        qk, v = qkv.split([nq * self.hd, self.nkv * self.hd], dim=-1)
        qk = qk.view(b, t, nq, self.hd)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, : self.nh]), self.k_norm(qk[:, :, self.nh :])], dim=2)
        # RoPE on q and k together; `sin` carries rotate_half's sign, so a roll replaces chunk/neg/cat.
        qk = qk.transpose(1, 2)
        qk = qk * cos + torch.roll(qk, self.hd // 2, dims=-1) * sin
        q, k = qk.split([self.nh, self.nkv], dim=1)
        return q, k, v.view(b, t, self.nkv, self.hd).transpose(1, 2)

    def attend(self, q, keys, vals, mask, out_dtype):
        """Attention over the given keys/values, then the output projection."""
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, vals, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.out(y, out_dtype)

    def out(self, y, out_dtype):
        """The output projection of attention's result y (B, nh, T, hd)."""
        b, _, t, _ = y.shape
        return self.wo(y.to(out_dtype).transpose(1, 2).reshape(b, t, self.nh * self.hd))

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, kv_len):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if slots is None:  # contiguous write shared by the batch (the common single-stream case)
            start = kv_len - t
            k_cache[:, :, start:kv_len] = k
            v_cache[:, :, start:kv_len] = v
        else:  # per-sequence slots: slots (B, T)
            bidx = torch.arange(b).unsqueeze(1)
            k_cache[bidx, :, slots] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[bidx, :, slots] = v.transpose(1, 2).to(v_cache.dtype)
        if isinstance(mask, AttentionPlan):  # the exact runtime: the plan indexes the whole cache
            return self.out(exact_attention(q, k_cache, v_cache, mask), x.dtype)
        keys, vals = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        if t == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # CPU SDPA in bf16 is 4x slower than in fp32 for a single query (AVX512-BF16 EPYC, per layer:
            # 614 vs 153 us over 1000 keys; 2968 vs 693 us for a batch of 16 over 300): upcasting q/k/v
            # costs less than it saves. From 2 queries on, the two are equal, so trees stay in bf16.
            keys, vals = keys.float(), vals.float()
        return self.attend(q, keys, vals, mask, x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.inter = intermediate
        self.w13 = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.inter, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, kv_len):
        x = x + self.attn(self.attn_norm(x), cos, sin, k_cache, v_cache, slots, mask, kv_len)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    # Set by the loader where every linear is row-invariant (the GGUF's int4 kernel): attention then
    # runs `exact_attention`, and the whole forward computes each row as plain decoding would.
    exact = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for (B, T) positions, shaped (B, 1, T, head_dim); tables built in fp64."""
        need = int(positions.max()) + 1
        c = self._rope_cache
        if c is None or c[0].shape[0] < need or c[0].dtype != dtype or c[0].device != positions.device:
            n = max(need, self.cfg.max_position, 1)
            hd = self.cfg.head_dim
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            half = hd // 2
            sign = torch.cat([-torch.ones(half, dtype=torch.float64), torch.ones(half, dtype=torch.float64)])
            dev = positions.device
            self._rope_cache = (emb.cos().to(dev, dtype), (emb.sin() * sign).to(dev, dtype))
        cos, sin = self._rope_cache
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_len: int,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        taps: tuple[int, ...] = (),
        logits_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the decoder over `tokens` (B, T).

        K/V go to cache slots [kv_len - T, kv_len) (or `slots`); attention covers
        slots [0, kv_len) under `mask` (B, 1, T, kv_len) bool, None = all visible.
        Returns logits (B, T, V) (or only `logits_rows` of T) and the residual
        stream after each layer in `taps`, concatenated: (B, T, len(taps)*H).
        """
        x = self.embed(tokens)
        cos, sin = self.rope(positions, x.dtype)
        if self.exact:  # one plan for every layer, over the whole cache
            b, t = tokens.shape
            mask = plan_attention(visibility(mask, b, t, kv_len), k_cache.shape[3])
        tapped = []
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_cache[i], v_cache[i], slots, mask, kv_len)
            if i in taps:
                tapped.append(x)
        if logits_rows is not None:
            x = x[:, logits_rows]
        head = getattr(self, "lm_head_packed", None) or self.lm_head
        logits = head(self.norm(x))
        return logits, (torch.cat(tapped, dim=-1) if tapped else None)


# PackedLinears by handle, for the custom op below (weak: a dropped model frees its weights).
_HANDLES = itertools.count()
# Set by CompiledDecoder while it traces/calls its frozen one-token graph (Dynamo guards on it).
FROZEN_TRACE = False
_PACKED: "weakref.WeakValueDictionary[int, PackedLinear]" = weakref.WeakValueDictionary()


@torch.library.custom_op("paratree::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """A PackedLinear as one opaque op, so TorchInductor graphs can call it (`models/compiled.py`).

    Its packed weights are oneDNN/MKL layouts that tracing cannot represent. Inductor's own
    packing (`freezing`) specialised its graphs on the row count, one compile per tree size."""
    return _PACKED[handle]._run(x)


@packed_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


class PackedLinear(nn.Module):
    """A Linear whose weight is also pre-packed for the CPU GEMM kernels (inference only).

    Why: on these CPUs the stock kernels are slow exactly where speculative decoding lives
    (a 16-row tree through stock fp32 `F.linear` cost ~6x one row on the Intel VM), and which
    kernel is fastest at which row count depends on the CPU (`models/kernels.py`). fp32 keeps
    the plain weight plus the packed layouts its measured `KernelRoute` uses (oneDNN's, and/or
    MKL copies packed for fixed row buckets); bf16 (no MKL kernel) always takes oneDNN's packed
    layout: its stock GEMV streams ~11 GB/s, the packed one ~19 GB/s.
    """

    def __init__(self, linear: nn.Linear, route: KernelRoute | None, keep_plain: bool = False):
        super().__init__()
        self.out_features = linear.out_features
        w = linear.weight.detach()
        self.weight_bytes = w.numel() * w.element_size()  # what one pass reads, whichever layout serves it
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.route = route if w.dtype == torch.float32 else None
        self.plain = w if self.route is not None or keep_plain else None
        # keep_plain (--compile): the one-token graph is frozen, and Inductor packs its own copy
        # from this Parameter (a view of the same weight memory).
        self.frozen_w = nn.Parameter(w, requires_grad=False) if keep_plain else None
        self.buckets = self.route.buckets if self.route is not None else ()
        self.mkl = {m: torch.ops.mkl._mkl_reorder_linear_weight(w, m) for m in self.buckets}
        need_onednn = self.route is None or self.route.uses_onednn
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 16) if need_onednn else None

        self.handle = next(_HANDLES)
        _PACKED[self.handle] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            if FROZEN_TRACE and self.frozen_w is not None:
                y = F.linear(x2, self.frozen_w, self.bias)
            else:
                y = packed_linear(x2, self.handle, self.out_features)
        else:
            y = self._run(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        kernel = "onednn" if self.route is None else self.route.kernel(rows)
        if kernel == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        elif kernel == "mkl":
            m = next(b for b in self.buckets if b >= rows)
            xp = x2 if m == rows else F.pad(x2, (0, 0, 0, m - rows))
            y = torch.ops.mkl._mkl_linear(xp, self.mkl[m], self.plain, self.bias, m)[:rows]
        else:
            y = F.linear(x2, self.plain, self.bias)
        return y


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown, which disables the extra layouts)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _pack_plan(module: nn.Module, cache: Path | None) -> tuple[bool, KernelRoute | None]:
    """(pack at all?, fp32 route) for the Linears below `module`: bf16 packs for oneDNN; fp32 takes
    the kernel route measured on this CPU, with as many packed copies as fit in 60% of free memory."""
    lins = _linears(module)
    if not lins or not torch.backends.mkldnn.is_available():
        return False, None
    dt = lins[0].weight.dtype
    if dt == torch.bfloat16:
        return True, None
    if dt != torch.float32:
        return False, None
    copy_bytes = sum(m.weight.numel() * m.weight.element_size() for m in lins)
    fit = int(0.6 * _available_bytes() // max(1, copy_bytes))
    if not torch.backends.mkl.is_available():
        fit = min(fit, 1)
    route = fp32_route([tuple(m.weight.shape) for m in lins], fit, cache)
    return route.name != "stock", route


def _swap_linears(module: nn.Module, route: KernelRoute | None, keep_plain: bool = False) -> bool:
    dt = next(module.parameters()).dtype
    try:
        probe = PackedLinear(nn.Linear(8, 8, bias=True).to(dt), route)
        for n in (1, 4, 200):
            probe(torch.zeros(n, 8, dtype=dt))
    except (RuntimeError, AttributeError, StopIteration):
        return False
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, route, keep_plain))
    return True


def pack_for_cpu(model: "Transformer", cache: Path | None = None, keep_plain: bool = False) -> bool:
    """Swap the decoder's Linears for packed ones where supported; returns whether it did.

    bf16: oneDNN-packed only. fp32: the plain weight plus the packed layouts of the kernel route
    timed on this CPU (`models/kernels.py`, cached under `cache`), as many copies as fit in 60%
    of the memory available now. fp64 (the exactness tests) and other dtypes are left alone.
    `keep_plain`: bf16 keeps its plain weight too (`--compile` freezes a graph from it).
    """
    ok, route = _pack_plan(model.layers, cache)
    model.kernel_route = route if route is not None and route.name == "stock" else None  # fp32 timed stock
    if not ok or not _swap_linears(model.layers, route, keep_plain):
        return False
    # lm_head keeps its plain weight too: draft heads share it (frozen) with the target.
    model.lm_head_packed = PackedLinear(model.lm_head, route, keep_plain)
    model.kernel_route = route
    return True


def pack_linears_for_inference(module: nn.Module, route: KernelRoute | None) -> bool:
    """The same packing for a draft head at draft time, on the target's fp32 `route` (a block of
    D+1 rows is exactly where a slow kernel hurts). Inference only: a PackedLinear holds no
    Parameters. fp32 without a route is left alone."""
    lins = _linears(module)
    if not lins or not torch.backends.mkldnn.is_available():
        return False
    dt = lins[0].weight.dtype
    if dt == torch.float32 and route is not None and route.name != "stock":
        return _swap_linears(module, route)
    return dt == torch.bfloat16 and _swap_linears(module, None)


def linear_kernels(model: "Transformer") -> tuple[str, tuple[int, ...]]:
    """(route name, MKL row buckets): which GEMM kernels the decoder's Linears use ('stock',
    'onednn', 'stock2-mkl4.8.16.32.64-stock', 'inductor-onednn', ...).

    The verify cost curve depends on it (a bucketed kernel makes the curve a staircase), so
    calibration profiles are keyed by it and measure both sides of every bucket edge.
    """
    lin = model.layers[0].mlp.w13 if len(model.layers) else None
    if type(lin).__name__ == "Int4Linear":  # the GGUF's 4-bit codes (models/quant.py)
        # --exact's attention costs more than SDPA, so its cost curve is keyed apart
        name, buckets = ("int4-exact" if getattr(model, "exact", False) else "int4"), ()
    else:
        name, buckets = ("stock", ()) if not isinstance(lin, PackedLinear) else \
            ("onednn", ()) if lin.route is None else (lin.route.name, lin.buckets)
    if getattr(model, "compiled", None) is not None:  # the same kernels inside TorchInductor graphs
        name = "inductor-" + name
    return name, buckets


def hf_layout(cfg: ModelConfig) -> list[tuple[str, list[str], list[int]]]:
    """(own parameter name, the Hugging Face names fused into it, their row counts), for every weight.

    The one name mapping between the two layouts, read in both directions: loading fuses
    q|k|v and gate|up rows; `hf_state_dict` splits them back.
    """
    q, kv, ffn = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = [("embed.weight", ["model.embed_tokens.weight"], [cfg.vocab_size]),
           ("norm.weight", ["model.norm.weight"], [cfg.hidden_size])]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ["lm_head.weight"], [cfg.vocab_size]))
    for i in range(cfg.num_layers):
        p, a, m = f"model.layers.{i}.", f"layers.{i}.attn.", f"layers.{i}.mlp."
        out.append((a + "wqkv.weight", [p + f"self_attn.{n}_proj.weight" for n in "qkv"], [q, kv, kv]))
        if cfg.attention_bias:
            out.append((a + "wqkv.bias", [p + f"self_attn.{n}_proj.bias" for n in "qkv"], [q, kv, kv]))
        out.append((a + "wo.weight", [p + "self_attn.o_proj.weight"], [cfg.hidden_size]))
        if cfg.qk_norm:
            out.append((a + "q_norm.weight", [p + "self_attn.q_norm.weight"], [cfg.head_dim]))
            out.append((a + "k_norm.weight", [p + "self_attn.k_norm.weight"], [cfg.head_dim]))
        out.append((m + "w13.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], [ffn, ffn]))
        out.append((m + "w2.weight", [p + "mlp.down_proj.weight"], [cfg.hidden_size]))
        out.append((f"layers.{i}.attn_norm.weight", [p + "input_layernorm.weight"], [cfg.hidden_size]))
        out.append((f"layers.{i}.mlp_norm.weight", [p + "post_attention_layernorm.weight"], [cfg.hidden_size]))
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor] | None:
    """The model's weights under Hugging Face names, as views of its own tensors (no copy).

    Lets the benchmark's HF peers run on the very same memory, so a 1.5B target and its
    HF twin do not need two copies. None if a Linear keeps only a packed layout (bf16) or
    4-bit codes (`--dtype gguf`), which have no plain weight to view.
    """
    sd: dict[str, torch.Tensor] = {}
    for own, names, rows in hf_layout(model.cfg):
        mod_name, _, attr = own.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = mod.plain if isinstance(mod, PackedLinear) and attr == "weight" else getattr(mod, attr, None)
        if t is None:
            return None
        sd.update(zip(names, t.split(rows)))
    return sd


def load_hf_state_dict(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face-named weights into the fused layout, failing loudly on gaps."""
    cfg = model.cfg
    own = {o: sd[names[0]] if len(names) == 1 else torch.cat([sd[n] for n in names]) for o, names, _ in hf_layout(cfg)}
    own["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    dt = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dt) for k, v in own.items()}, strict=True)
    if cfg.tie_embeddings:  # share one tensor instead of holding the vocab matrix twice
        model.lm_head.weight = model.embed.weight
