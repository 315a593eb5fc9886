"""The target runner: a preallocated KV cache plus prefill / verify / commit.

Cache invariant (as in JetSpec): the cache holds every committed token except
the last one. That last token is the root of the next draft tree, so one
`verify` call both consumes it and scores the whole tree; `commit(path)` then
keeps the root and the accepted nodes and drops the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tree.draft_tree import DraftTree
from .transformer import Transformer


class ContextOverflowError(ValueError):
    """The sequence would not fit in the preallocated KV cache."""


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # (N, V): row i = next-token logits after the root-to-i path
    taps: torch.Tensor | None  # (N, len(taps) * hidden) residual stream at tapped layers


class TargetRunner:
    """Runs one target model over B independent sequences, each with its own KV state."""

    def __init__(self, model: Transformer, max_len: int | None = None, batch_size: int = 1):
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.dtype = next(model.parameters()).dtype
        self.max_len = int(max_len or cfg.max_position)
        self.batch_size = batch_size
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        # The exact runtime attends in fp32: its cache holds the bf16 keys exactly, upcast once when written
        # instead of once per layer and step when read.
        cache_dtype = torch.float32 if getattr(model, "exact", False) else self.dtype
        self.k = torch.zeros(shape, dtype=cache_dtype)
        self.v = torch.zeros(shape, dtype=cache_dtype)
        self.lengths = [0] * batch_size
        self._last_tree_size = [0] * batch_size

    # -- bookkeeping -----------------------------------------------------------------
    def reset(self, seq: int = 0) -> None:
        """Forget sequence `seq` (stale K/V beyond its length are never attended)."""
        self.lengths[seq] = 0
        self._last_tree_size[seq] = 0

    def _check_room(self, seq: int, n: int) -> None:
        if self.lengths[seq] + n > self.max_len:
            raise ContextOverflowError(
                f"sequence needs {self.lengths[seq] + n} positions but the context window is {self.max_len}"
            )

    # -- single-sequence API -----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: list[int] | torch.Tensor, taps: tuple[int, ...] = (), chunk: int = 256, seq: int = 0):
        """Append committed tokens to the cache; returns taps for them (or None)."""
        ids = torch.as_tensor(tokens, dtype=torch.long).view(-1)
        self._check_room(seq, ids.numel())
        out = []
        for s in range(0, ids.numel(), chunk):
            part = ids[s : s + chunk]
            tree = DraftTree.chain(part.tolist())
            res = self._forward_tree(tree, taps, seq, need_logits=False)
            self.lengths[seq] += part.numel()
            if res.taps is not None:
                out.append(res.taps)
        return torch.cat(out) if out else None

    @torch.inference_mode()
    def verify(self, tree: DraftTree, taps: tuple[int, ...] = (), seq: int = 0) -> VerifyOutput:
        """Score every node of `tree` in ONE forward (tree attention mask, positions = past + depth)."""
        self._check_room(seq, tree.num_nodes)
        out = self._forward_tree(tree, taps, seq, need_logits=True)
        self._last_tree_size[seq] = tree.num_nodes
        return out

    def commit(self, path: list[int], seq: int = 0) -> None:
        """Keep the root and the accepted nodes of the last verified tree, in path order."""
        n = self._last_tree_size[seq]
        if not path or path[0] != 0 or any(p >= n for p in path):
            raise ValueError(f"invalid path {path} for a verified tree of {n} nodes")
        start = self.lengths[seq]
        if path != list(range(len(path))):  # accepted nodes are not already contiguous
            src = torch.tensor(path) + start
            dst = slice(start, start + len(path))
            self.k[:, seq, :, dst] = self.k[:, seq, :, src]
            self.v[:, seq, :, dst] = self.v[:, seq, :, src]
        self.lengths[seq] = start + len(path)
        self._last_tree_size[seq] = 0

    def discard(self, seq: int = 0) -> None:
        """Forget the last verified tree without committing any of it (timing runs, dropped rounds)."""
        self._last_tree_size[seq] = 0

    def truncate(self, n: int, seq: int = 0) -> None:
        """Keep only the first `n` cached tokens of `seq` (a drafter rolling back its own cache)."""
        if not 0 <= n <= self.lengths[seq]:
            raise ValueError(f"cannot truncate a cache of {self.lengths[seq]} tokens to {n}")
        self.lengths[seq] = n
        self._last_tree_size[seq] = 0

    def warmup(self, taps: tuple[int, ...] = ()) -> None:
        """Build a compiled model's verify graphs for `taps` before anything is timed (no-op eagerly)."""
        compiled = getattr(self.model, "compiled", None)
        if compiled is not None:
            compiled.warmup(taps)

    def step(self, token: int, seq: int = 0) -> torch.Tensor:
        """Plain decoding: feed one committed token, return next-token logits (V,)."""
        out = self.verify(DraftTree.chain([token]), seq=seq)
        self.commit([0], seq=seq)
        return out.logits[0]

    # -- internals ---------------------------------------------------------------------
    def _forward_tree(self, tree: DraftTree, taps, seq: int, need_logits: bool) -> VerifyOutput:
        start = self.lengths[seq]
        n = tree.num_nodes
        kv_len = start + n
        positions = (tree.depths + start).view(1, n)
        if n == 1:
            mask = None
        else:
            mask = torch.ones(1, 1, n, kv_len, dtype=torch.bool)
            is_chain = bool((tree.parents[1:] == torch.arange(n - 1)).all())
            mask[0, 0, :, start:] = torch.ones(n, n, dtype=torch.bool).tril() if is_chain else tree.ancestor_mask()
        b = self.batch_size
        if b == 1:
            k, v, slots = self.k, self.v, None
        else:  # one sequence of a batched cache: view its row, keep the contiguous write path
            k, v, slots = self.k[:, seq : seq + 1], self.v[:, seq : seq + 1], None
        compiled = getattr(self.model, "compiled", None)
        if compiled is not None and need_logits:
            out = compiled(tree.tokens.view(1, n), positions, k, v, start, mask, taps)
            if out is not None:
                return VerifyOutput(logits=out[0][0], taps=None if out[1] is None else out[1][0])
        rows = None if need_logits else torch.tensor([n - 1])
        logits, tapped = self.model(
            tree.tokens.view(1, n), positions, k, v, kv_len, slots=slots, mask=mask, taps=taps, logits_rows=rows
        )
        return VerifyOutput(logits=logits[0], taps=None if tapped is None else tapped[0])

    # -- batched API (continuous batching: one forward over several sequences) -------
    @torch.inference_mode()
    def verify_batch(self, trees: list[DraftTree], seqs: list[int], taps: tuple[int, ...] = ()) -> "BatchVerifyOutput":
        """Score the trees of several sequences in ONE forward.

        trees[i] is rooted at the last committed token of sequence seqs[i]. Trees are
        padded to the largest node count; each row gets its own positions (own length
        + depth), its own cache write slots and its own tree mask, so every row sees
        exactly what `verify(trees[i], seq=seqs[i])` would show it. Padding nodes see
        only themselves and write to one scratch slot right after their row's tree,
        which therefore needs one free slot (``ContextOverflowError`` otherwise).
        The forward spans the contiguous cache rows min(seqs)..max(seqs); rows in
        between that are not verified get padding only (written past their length and
        past any tree still awaiting `commit`). Follow with `commit(path, seq)` per row.
        """
        if len(trees) != len(seqs) or not trees:
            raise ValueError("verify_batch needs one tree per sequence and at least one")
        if len(set(seqs)) != len(seqs) or any(not 0 <= s < self.batch_size for s in seqs):
            raise ValueError(f"invalid sequence ids {seqs} for a cache of {self.batch_size} rows")
        lo, hi = min(seqs), max(seqs) + 1
        nrow = hi - lo
        by_row: dict[int, DraftTree] = {s - lo: t for s, t in zip(seqs, trees)}
        n_max = max(t.num_nodes for t in trees)
        starts = torch.tensor([self.lengths[lo + r] for r in range(nrow)], dtype=torch.long)
        sizes = torch.zeros(nrow, dtype=torch.long)
        tokens = torch.zeros(nrow, n_max, dtype=torch.long)  # padding token 0: finite K/V
        parents = torch.full((nrow, n_max), -1, dtype=torch.long)
        depths = torch.zeros(nrow, n_max, dtype=torch.long)
        for r in range(nrow):
            s = lo + r
            t = by_row.get(r)
            if t is None:  # not verified this round: padding after any uncommitted tree
                starts[r] += self._last_tree_size[s]
                continue
            self._check_room(s, t.num_nodes)
            n = t.num_nodes
            sizes[r] = n
            tokens[r, :n] = t.tokens
            parents[r, :n] = t.parents
            depths[r, :n] = t.depths
        has_pad = sizes < n_max
        ends = starts + sizes  # scratch slot of the row's padding
        if bool((ends[has_pad] >= self.max_len).any()):
            raise ContextOverflowError("no free cache slot after a tree for batch padding; allocate max_len + 1")
        kv_len = int((ends + has_pad.long()).max())
        node = torch.arange(n_max)
        real = node[None, :] < sizes[:, None]  # (R, N)
        slots = torch.where(real, starts[:, None] + node[None, :], ends[:, None])
        positions = torch.where(real, starts[:, None] + depths, ends[:, None])
        # ancestor-or-self within each tree, built by walking parents up (max depth steps)
        anc = torch.zeros(nrow, n_max, n_max, dtype=torch.bool)
        anc[:, node, node] = real
        rows = torch.arange(nrow)[:, None].expand(nrow, n_max)
        cur = parents.clone()
        for _ in range(int(depths.max()) if n_max > 1 else 0):
            ok = cur >= 0
            anc[rows[ok], node.expand(nrow, n_max)[ok], cur[ok]] = True
            cur = torch.where(ok, parents.gather(1, cur.clamp_min(0)), cur)
        kv = torch.arange(kv_len)
        mask = (kv[None, None, :] < starts[:, None, None]) & real[:, :, None]  # committed prefix
        rel = kv - starts[:, None]  # (R, kv) offset into the row's tree
        in_tree = (rel >= 0) & (rel < n_max)
        tree_part = anc.gather(2, rel.clamp(0, n_max - 1)[:, None, :].expand(nrow, n_max, kv_len))
        mask |= tree_part & in_tree[:, None, :]
        mask |= (~real)[:, :, None] & (kv[None, None, :] == ends[:, None, None])  # padding sees itself
        k, v = self.k[:, lo:hi], self.v[:, lo:hi]
        logits, tapped = self.model(tokens, positions, k, v, kv_len, slots=slots, mask=mask[:, None], taps=taps)
        for s, t in zip(seqs, trees):
            self._last_tree_size[s] = t.num_nodes
        idx = torch.tensor([s - lo for s in seqs])
        return BatchVerifyOutput(logits=logits[idx], taps=None if tapped is None else tapped[idx],
                                 sizes=[t.num_nodes for t in trees])

    def commit_batch(self, paths: list[list[int]], seqs: list[int]) -> None:
        """`commit(path, seq)` for every verified row."""
        for path, s in zip(paths, seqs):
            self.commit(path, seq=s)

    @torch.inference_mode()
    def move_seq(self, src: int, dst: int) -> None:
        """Move sequence `src`'s committed K/V and length to row `dst` (compaction); `src` is reset."""
        if src == dst:
            return
        if self._last_tree_size[src]:
            raise ValueError("cannot move a sequence with an uncommitted verified tree")
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self._last_tree_size[dst] = 0
        self.reset(src)


@dataclass
class BatchVerifyOutput:
    logits: torch.Tensor  # (B, N_max, V): row b, node i = next-token logits after trees[b]'s root-to-i path
    taps: torch.Tensor | None  # (B, N_max, len(taps) * hidden)
    sizes: list[int]  # real node count per row (rows past it are padding)


def greedy_tokens(runner: TargetRunner, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding of `n` tokens after `prompt` (no EOS stop): the reference other paths match."""
    runner.reset()
    runner.prefill(prompt[:-1])
    tok, out = prompt[-1], []
    for _ in range(n):
        tok = int(runner.step(tok).argmax())
        out.append(tok)
    return out
