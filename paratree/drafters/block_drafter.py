"""Drafting with a trained block head: JetSpec (tree), DFlash (chain), DDTree (tree over DFlash).

One head pass over [root, MASK x D] gives per-depth distributions; the tree
builder turns them into a best-first tree (or the argmax chain). Context K/V of
the head are cached and extended with the taps of each round's accepted
tokens, so a round costs one small pass over D+1 rows, not over the context.
"""

from __future__ import annotations

import torch

from ..tree.builders import build_best_first, build_chain
from ..tree.draft_tree import DraftTree
from ..models.kernels import KernelRoute
from ..models.transformer import pack_linears_for_inference
from .heads.block import BlockDraftHead
from .registry import BuildContext, load_family_head


class BlockHeadDrafter:
    def __init__(self, head: BlockDraftHead, embed: torch.nn.Embedding, lm_head, name: str, tree: bool = True,
                 width: int = 8, max_depth: int | None = None, path_conditioned: bool = False,
                 pack: bool = False, route: KernelRoute | None = None):
        """`pack`: give the draft-vocab projection the target's packed CPU kernels (fp32: on the
        target's `route`; the head's own Linears are packed by `make_drafter`)."""
        self.head, self.embed, self.lm_head = head.eval(), embed, lm_head
        self.name, self.tree, self.width = name, tree, width
        self.max_depth = min(max_depth or head.cfg.depth, head.cfg.depth)
        if path_conditioned and head.cfg.shifted:
            raise ValueError(f"{name}: a shifted (DFlash-layout) head's rows predict their own position, "
                             f"so they cannot carry branch tokens (path conditioning)")
        self.path_conditioned = path_conditioned
        self.tap_layers = tuple(head.cfg.tap_layers)
        self.dtype = next(head.parameters()).dtype
        # Reduced draft vocab: project onto those rows of the target LM head only, and map the
        # drafted indices back to target ids (d2t) before anything leaves the drafter.
        self.d2t = head.d2t
        if self.d2t is not None:
            w = head.lm_weight(lm_head.weight.detach()).contiguous()
            proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
            proj.weight = torch.nn.Parameter(w, requires_grad=False)
            self.lm_head = torch.nn.Sequential(proj)
            if pack:
                pack_linears_for_inference(self.lm_head, route)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ctx_len = 0
        self._last: torch.Tensor | None = None  # fused state of the newest context token (the root's predecessor)

    @classmethod
    def for_family(cls, ctx: BuildContext, family: str, name: str, tree: bool, path_conditioned: bool = False
                   ) -> "BlockHeadDrafter":
        """The drafter `name` over the `family` head that `ctx` names (or the shipped one)."""
        head, packed = load_family_head(ctx, family, name)
        model = ctx.lm.model
        lm_head = model.lm_head if head.d2t is not None else (getattr(model, "lm_head_packed", None) or model.lm_head)
        return cls(head, model.embed, lm_head, name=name, tree=tree, width=ctx.width,
                   path_conditioned=path_conditioned, pack=packed, route=getattr(model, "kernel_route", None),
                   **ctx.options)

    # -- context ----------------------------------------------------------------------
    def begin(self, prompt_ids, prompt_taps):
        self._kv, self._ctx_len, self._last = [], 0, None
        if prompt_taps is not None and prompt_taps.shape[0]:
            self._append(prompt_taps)

    def update(self, new_tokens, new_taps):
        if new_taps is not None:
            self._append(new_taps)

    @torch.inference_mode()
    def _append(self, taps: torch.Tensor) -> None:
        n = taps.shape[0]
        ctx = self.head.fuse(taps.to(self.dtype).unsqueeze(0))
        pos = torch.arange(self._ctx_len, self._ctx_len + n).unsqueeze(0)
        new = self.head.context_kv(ctx, pos)
        self._last = ctx[:, -1:]
        self._kv = new if not self._kv else [(torch.cat([k, nk], 2), torch.cat([v, nv], 2))
                                             for (k, v), (nk, nv) in zip(self._kv, new)]
        self._ctx_len += n

    def _context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer context K/V; empty (zero rows) before any taps arrived."""
        if self._kv:
            return self._kv
        empty = torch.zeros(1, self.head.cfg.num_kv_heads, 0, self.head.cfg.head_dim, dtype=self.dtype)
        return [(empty, empty) for _ in self.head.layers]

    # -- drafting ---------------------------------------------------------------------
    @torch.inference_mode()
    def block_logits(self, root: int, branch: list[int] | None = None) -> torch.Tensor:
        """Per-depth logits (D, V) for the block rooted at `root` (row 0 = root at the next position).

        `branch` fills the rows after the root with real tokens (path conditioning):
        row i then predicts depth i+1 given the branch.
        """
        return self.lm_head(self.block_hidden(root, branch).to(self.embed.weight.dtype)).float()

    @torch.inference_mode()
    def block_hidden(self, root: int, branch: list[int] | None = None) -> torch.Tensor:
        """The head's final-normed states (D, H) of the block rooted at `root`."""
        d = self.head.block_rows(self.max_depth)
        toks = torch.full((1, d), -1, dtype=torch.long)
        toks[0, 0] = root
        if branch:
            toks[0, 1 : 1 + len(branch)] = torch.tensor(branch[: d - 1])
        x = self.head.block_embeddings(self.embed.weight, toks, self._last).to(self.dtype)
        pos = torch.arange(self._ctx_len, self._ctx_len + d).unsqueeze(0)
        mask = None
        if self.head.cfg.causal:
            mask = torch.ones(d, self._ctx_len + d, dtype=torch.bool)
            mask[:, self._ctx_len :] = torch.ones(d, d, dtype=torch.bool).tril()
        return self.head.depth_states(self.head.forward_blocks(x, pos, self._context(), mask)[0])

    @torch.inference_mode()
    def conditioned_logits(self, tree: DraftTree) -> torch.Tensor:
        """Next-token logits (N, V) for every node of `tree`, each conditioned on its own branch.

        One head pass under a tree mask: node rows carry their real tokens and see only
        their ancestors, exactly as the rows of a block whose prefix was un-masked in
        training; a causal head's row predicts the token after it, so node i's row gives
        node i's children.
        """
        n, c = tree.num_nodes, self._ctx_len
        x = self.head.block_embeddings(self.embed.weight, tree.tokens.view(1, n), self._last).to(self.dtype)
        pos = (c + tree.depths).view(1, n)
        mask = torch.ones(n, c + n, dtype=torch.bool)
        mask[:, c:] = tree.ancestor_mask()
        h = self.head.forward_blocks(x, pos, self._context(), mask)
        return self.lm_head(h[0].to(self.embed.weight.dtype)).float()

    def _to_target(self, tree: DraftTree) -> DraftTree:
        """Draft-vocab indices of the non-root nodes -> target token ids."""
        if self.d2t is not None and tree.num_nodes > 1:
            tree.tokens = torch.cat([tree.tokens[:1], self.d2t[tree.tokens[1:]]])
        return tree

    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        root = tokens[-1]
        logits = self.block_logits(root)
        logp = torch.log_softmax(logits, dim=-1)
        if not self.tree or budget <= self.max_depth + 1 and self.width == 1:
            chain = logp.argmax(-1)[: max(0, budget - 1)]
            lp = logp.gather(-1, chain.unsqueeze(-1)).squeeze(-1)
            return self._to_target(build_chain(root, chain.tolist(), logps=lp, q=None))
        tree = build_best_first(root, logp, budget=budget, max_depth=self.max_depth, width=self.width, keep_q=False)
        tree = self._to_target(tree)
        if not self.path_conditioned or tree.num_nodes < 2:
            return tree
        # Refresh: rebuild best-first with each node's children drawn from its branch-conditioned
        # distribution; branches the first tree did not contain fall back to the per-depth marginal.
        cond = torch.log_softmax(self.conditioned_logits(tree), dim=-1)
        by_path = {tuple(tree.tokens[tree.path_to(i)[1:]].tolist()): i for i in range(tree.num_nodes)}
        d2t = self.d2t.tolist() if self.d2t is not None else None

        def path_dist(path: list[int]) -> torch.Tensor:  # path in draft-vocab indices
            i = by_path.get(tuple(path if d2t is None else (d2t[t] for t in path)))
            return cond[i] if i is not None else logp[len(path)]

        return self._to_target(build_best_first(root, None, budget=budget, max_depth=self.max_depth,
                                                width=self.width, path_dist=path_dist, keep_q=False))
