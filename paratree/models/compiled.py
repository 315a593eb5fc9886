"""The single-sequence decoder forward compiled by TorchInductor (opt-in: `--compile`).

Why: on 2 CPU cores a bf16 decode step of the 135M default model is not only weight
streaming. ~40% of it is dispatch of small ops (30 layers × ~20 norms, RoPE pieces, residual
adds, casts), µs each. Inductor fuses those into a few C++ loops and the C++ wrapper calls
the kernels with no Python in between. The AMX VM of session 12 measured 23.9 ms a step
eager, 14.1 ms compiled (docs/benchmarks.md).

Two kinds of graph:
- The one-token decode step (no taps) is compiled with `freezing`: Inductor treats the
  weights as constants and packs its own oneDNN copy of each linear (so the model keeps a
  plain copy, `keep_plain`, for it to read: +1 weight copy in memory).
- Tree verification and calls with taps are compiled with dynamic token counts and call
  paratree's own packed linears through the `paratree::packed_linear` op, so every tree size
  runs the same graph (a frozen graph specialised on each size and recompiled per tree).

The graph is functional by design. Attention reads cat(cache prefix, new K/V), and the graph
returns the new K/V, which `__call__` writes into the cache in one copy. Writing into a view
of the cache inside the graph made functionalisation copy the whole cache back every step:
1.1 s a step.

Cost: ~45 s of compile per graph on 2 cores (one decode graph, one tree graph per set of
taps), paid in `warmup` before timing starts. That is why it is opt-in: it pays off in
benchmarks and long generations, not in one short `generate`. Cases the graph does not cover
(an empty prefix, batch > 1, logits of all rows in a prefill) run eagerly.

The exact runtime (`model.exact`: the GGUF's int4 linears plus `exact_attention`) compiles
differently, because every call that can decide a committed token must round alike:
- two graphs, the one-token step and one for every tree size, each taking the attention plan as
  tensors (models/attention.py). Block counts are kept >= 2 and marked dynamic, so no later call
  recompiles into a third graph that might round differently;
- each returns every layer's residual, so drafters with taps and plain decoding share them;
- `emulate_precision_casts`: fused kernels round intermediates to their dtype as eager does;
- no frozen graph and no eager fallback mid-generation except where the cache is shorter than
  the plan's 2 blocks (`max_len` < 128).
Its first compile takes ~11 min on 2 cores for the default model (Inductor's cache makes later
loads ~35 s); tests/test_exact.py checks both graphs against each other on tiny int4 models.
"""

from __future__ import annotations

import shutil
import warnings

import torch

from . import transformer
from .attention import KEY_CHUNK, exact_attention, plan_attention, visibility
from .transformer import Transformer


def compiler_available() -> bool:
    """Inductor's CPU backend builds C++ at run time, so it needs a compiler on PATH."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class CompiledDecoder:
    """`model`'s forward for one sequence whose new K/V go right after its committed prefix."""

    def __init__(self, model: Transformer):
        if not compiler_available():
            raise RuntimeError("--compile needs a C++ compiler (g++ or clang++) on PATH for TorchInductor")
        self.model = model
        dt = next(model.parameters()).dtype
        # Single-query bf16 SDPA is slow on CPU (see Attention.forward); here the upcast is fused
        # into the prefix copy, so every row count takes it.
        self.attn_dtype = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
        self.exact = bool(getattr(model, "exact", False))
        if self.exact:  # two graphs (one-token, trees) with marked dynamic sizes (see _call_exact)
            # emulate_precision_casts: a fused kernel rounds each intermediate to its dtype as eager does.
            # Without it, the new keys fed to this forward's own attention stayed fp32 inside the graph
            # while the cache (what later steps read) got them rounded to bf16: every tree node differed.
            self._compiled = torch.compile(self._core_exact, dynamic=None, fullgraph=True,
                                           options={"cpp_wrapper": True, "emulate_precision_casts": True})
        else:
            self._compiled = torch.compile(self._core, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        self.failed: str | None = None
        self._warm: set[tuple[int, ...]] = set()
        # Forwards run through the graph, warm-up excluded: they bypass the module's forward hooks,
        # so whoever counts target forwards (bench's tokens/forward) adds these.
        self.calls = 0

    def warmup(self, taps: tuple[int, ...] = ()) -> None:
        """Compile the one-token and the tree graph for `taps` now, on a scratch cache.

        Why: a compile inside a timed round (~50 s) poisons everything that learns from measured
        round times (the draft gate, benchmarks). Sizes avoid 0 and 1, which Dynamo would
        specialise on, so the graphs built here serve every later prefix and tree size."""
        taps = () if self.exact else tuple(taps)  # the exact graph returns every layer's residual
        if taps in self._warm or self.failed is not None:
            return
        cfg, dt = self.model.cfg, next(self.model.parameters()).dtype
        if self.exact:  # sizes all distinct and >= 2, so none is specialised: T 5, 3 common + 2 tail blocks
            shape = (cfg.num_layers, 1, cfg.num_kv_heads, 4 * KEY_CHUNK + 8, cfg.head_dim)
            k, v = torch.zeros(shape), torch.zeros(shape)
            start, n = 3 * KEY_CHUNK + 7, 5
            self(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[start]]), k, v, start, None, ())
            self(torch.zeros(1, n, dtype=torch.long), torch.arange(start, start + n).view(1, n), k, v, start,
                 torch.ones(1, 1, n, start + n, dtype=torch.bool).tril(start), ())
            self.calls -= 2
            self._warm.add(taps)
            return
        shape = (cfg.num_layers, 1, cfg.num_kv_heads, 16, cfg.head_dim)
        # Made outside inference mode, like a runner's cache: Dynamo guards on the dispatch keys.
        k, v = torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)
        start, n = 4, 3
        self(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[start]]), k, v, start, None, taps)
        mask = torch.ones(1, 1, n, start + n, dtype=torch.bool)
        self(torch.zeros(1, n, dtype=torch.long), torch.arange(start, start + n).view(1, n), k, v, start, mask, taps)
        self.calls -= 2
        self._warm.add(taps)

    def _fn(self, tokens, cos, sin, k, v, start: int, mask, taps: tuple[int, ...]):
        # Taps go in as one bool per layer. Under dynamic=True, dynamo evaluated `i in taps` on a
        # tuple of ints as False (taps came back None, even with the eager backend); bools stay constants.
        flags = tuple(i in taps for i in range(len(self.model.layers)))
        if tokens.shape[1] > 1 or taps:
            # Tree sizes are marked dynamic by hand: after the frozen graph, `dynamic=True` alone
            # left the tree graph specialised on its first size (one more compile per tree size).
            for t, dims in ((tokens, (1,)), (cos, (2,)), (sin, (2,)), (mask, (2, 3))):
                if t is not None and t.shape[dims[0]] > 1:
                    for d in dims:
                        torch._dynamo.maybe_mark_dynamic(t, d)
            return self._compiled(tokens, cos, sin, k, v, start, mask, flags)
        # Plain decoding's one-token graph is frozen: Inductor packs constant weights and calls oneDNN
        # from C++ (15.4 ms a step against 17.9 through the packed_linear op). Frozen graphs specialise
        # on the row count, so trees keep the op. (`freezing` as a torch.compile option did not reach
        # the packing pass; the scoped config patch does.)
        from torch._inductor import config as inductor_config

        transformer.FROZEN_TRACE = True
        try:
            with inductor_config.patch(freezing=True):
                return self._compiled(tokens, cos, sin, k, v, start, mask, flags)
        finally:
            transformer.FROZEN_TRACE = False

    def _layers(self, tokens, cos, sin, attention, keep):
        """The decoder over `tokens` with `attention(i, layer.attn, q, new_k, new_v, x_dtype)` as layer i's
        attention output (after its projection). Returns logits, the new K/V stacked over layers, and the
        residual after each layer i where keep[i]."""
        m = self.model
        x = m.embed(tokens)
        new_k, new_v, resid = [], [], []
        for i, layer in enumerate(m.layers):
            a = layer.attn
            q, kn, vn = a.project(layer.attn_norm(x), cos, sin)
            x = x + attention(i, a, q, kn, vn, x.dtype)
            x = x + layer.mlp(layer.mlp_norm(x))
            new_k.append(kn)
            new_v.append(vn)
            if keep[i]:
                resid.append(x)
        head = getattr(m, "lm_head_packed", None) or m.lm_head
        return head(m.norm(x)), torch.stack(new_k), torch.stack(new_v), resid

    def _core(self, tokens, cos, sin, k, v, start: int, mask, tapped_layers: tuple[bool, ...]):
        def sdpa(i, a, q, kn, vn, dt):
            keys = torch.cat([k[i][:, :, :start], kn], dim=2).to(self.attn_dtype)
            vals = torch.cat([v[i][:, :, :start], vn], dim=2).to(self.attn_dtype)
            return a.attend(q, keys, vals, mask, dt)

        logits, nk, nv, tapped = self._layers(tokens, cos, sin, sdpa, tapped_layers)
        return logits, nk, nv, (torch.cat(tapped, dim=-1) if tapped else None)

    def _core_exact(self, tokens, cos, sin, k, v, common_ok, tail_src, tail_ok, window):
        """The exact runtime's forward: `exact_attention` on a plan given as tensors, new keys read from the
        graph's own outputs. It returns every layer's residual (the caller picks the taps), so plain
        decoding and every drafter share its two graphs (one-token, trees): no graph per set of taps."""
        plan = transformer.AttentionPlan(common_ok, tail_src, tail_ok, window)

        def exact(i, a, q, kn, vn, dt):
            return a.out(exact_attention(q, k[i], v[i], plan, kn, vn), dt)

        logits, nk, nv, resid = self._layers(tokens, cos, sin, exact, (True,) * len(self.model.layers))
        return logits, nk, nv, torch.stack(resid)

    def _call_exact(self, tokens, positions, k_cache, v_cache, start: int, mask, taps):
        """Two graphs: the one-token step (its size 1 is specialised) and one for every tree size. The plan
        has >= 2 blocks of each kind and its sizes are marked dynamic, so no later call recompiles."""
        t = tokens.shape[1]
        m = k_cache.shape[3]
        vis = visibility(mask, 1, t, start + t)
        plan = plan_attention(vis, start, new_at=(start, m), min_blocks=2)
        if plan is None or plan.common_ok.shape[2] * KEY_CHUNK > m:
            return None  # a mask the window cannot hold, or a cache shorter than the plan's 2 blocks: eager
        cos, sin = self.model.rope(positions, self.model.embed.weight.dtype)
        args = (tokens, cos, sin, k_cache, v_cache, plan.common_ok, plan.tail_src, plan.tail_ok, plan.window)
        dims = ((1,), (2,), (2,), (3,), (3,), (1, 2), (1, 2), (1, 2), ()) if t > 1 else \
            ((), (), (), (3,), (3,), (2,), (2,), (2,), ())
        for a, ds in zip(args, dims):
            for d in ds:
                torch._dynamo.mark_dynamic(a, d)
        logits, nk, nv, resid = self._compiled(*args)
        tapped = torch.cat([resid[i] for i in taps], -1) if taps else None
        return logits, nk, nv, tapped

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 start: int, mask: torch.Tensor | None, taps: tuple[int, ...] = ()):
        """Like `Transformer.forward` with slots [start, start + T), or None where it must run eagerly.

        `k_cache`/`v_cache`: (layers, 1, kv_heads, max_len, head_dim); they get the new K/V."""
        if self.failed is not None or (start < 1 and not self.exact) or tokens.shape[0] != 1:
            return None
        n = tokens.shape[1]
        try:
            with torch.inference_mode():
                # Inputs as inference tensors whoever made them: Dynamo guards on dispatch keys, and
                # a drafter's tokens (made outside inference mode) would otherwise compile a second graph.
                tokens = tokens.clone()
                mask = None if mask is None else mask.clone()
                if self.exact:
                    out = self._call_exact(tokens, positions, k_cache, v_cache, start, mask, tuple(taps))
                    if out is None:
                        return None
                    logits, nk, nv, tapped = out
                else:
                    cos, sin = self.model.rope(positions, self.model.embed.weight.dtype)
                    logits, nk, nv, tapped = self._fn(tokens, cos, sin, k_cache, v_cache, start, mask, tuple(taps))
        except Exception as e:  # a broken toolchain must not end generation: fall back, once, loudly
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"torch.compile failed, running eagerly from now on ({self.failed.splitlines()[0]})")
            return None
        with torch.inference_mode():
            k_cache[:, :, :, start:start + n] = nk
            v_cache[:, :, :, start:start + n] = nv
        self.calls += 1
        return logits, tapped
