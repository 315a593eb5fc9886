"""Drafting with an EAGLE-3-style autoregressive head (see heads/eagle.py for the positions).

The head keeps K/V of its own states for every committed position that has
target taps; each round first extends them with the taps that arrived (one
causal pass), then drafts a chain autoregressively, adding the head's top-k
alternatives at each depth as sibling leaves (children are deterministic
top-k: verified by the lossless rules for that case).

The chain stops at the first token the head itself gives less than `min_prob` (0.4): each chain
step is one sequential head pass, and past that point the target rarely accepts. On GSM8K with the
shipped EAGLE-3 head (budget 8, docs/benchmarks.md, session 17) this cut the draft pass from 10.2 to
3.3 ms a round for 9% of τ (1.73 -> 1.58), and tokens per second of draft + verify rose 1.7x.
"""

from __future__ import annotations

import torch

from ..tree.builders import build_chain_with_siblings
from ..tree.draft_tree import DraftTree
from .heads.eagle import EagleHead


class EagleDrafter:
    def __init__(self, head: EagleHead, embed: torch.nn.Embedding, lm_weight: torch.Tensor, name: str = "eagle",
                 width: int = 4, max_depth: int | None = None, min_prob: float = 0.4):
        self.head, self.embed, self.name = head.eval(), embed, name
        self.min_prob = min_prob
        self.lm_w = head.target_rows(lm_weight).contiguous()  # what head.logits reads, unless it has its own
        self.width, self.max_depth = width, max_depth or head.cfg.depth
        self.tap_layers = tuple(head.cfg.tap_layers)
        self.dtype = next(head.parameters()).dtype
        self.d2t = head.d2t

    def begin(self, prompt_ids, prompt_taps):
        self._kv = None  # per layer (K, V) of committed states 0..c-1
        self._c = 0
        self._h_last: torch.Tensor | None = None  # state c-1: predicts the token after the root
        self._pending: list[torch.Tensor] = []
        if prompt_taps is not None and prompt_taps.shape[0]:
            self._pending.append(prompt_taps)

    def update(self, new_tokens, new_taps):
        if new_taps is not None and new_taps.shape[0]:
            self._pending.append(new_taps)

    @torch.inference_mode()
    def _extend(self, tokens: list[int]) -> None:
        """States for positions with taps not yet folded in; x_{t+1} = tokens[t + 1] is committed."""
        if not self._pending:
            return
        taps = torch.cat(self._pending).to(self.dtype)
        self._pending = []
        n, c = taps.shape[0], self._c
        feats = self.head.fuse(taps.unsqueeze(0))
        nxt = torch.tensor(tokens[c + 1 : c + n + 1])
        x = self.head.step_input(self.embed(nxt).to(self.dtype).unsqueeze(0), feats)
        pos = torch.arange(c, c + n).unsqueeze(0)
        past = self._kv or self.head.empty_kv(feats)
        mask = torch.ones(n, c + n, dtype=torch.bool)
        mask[:, c:] = torch.ones(n, n, dtype=torch.bool).tril()
        h, own = self.head.run(x, pos, past, mask.view(1, 1, n, c + n))
        self._kv = own if self._kv is None else [(torch.cat([pk, ok], 2), torch.cat([pv, ov], 2))
                                                 for (pk, pv), (ok, ov) in zip(self._kv, own)]
        self._c, self._h_last = c + n, h[:, -1:]

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head.logits(h[0, -1], self.lm_w).float(), -1)

    @torch.inference_mode()
    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        root = tokens[-1]
        self._extend(tokens)
        depth = max(0, min(self.max_depth, budget - 1))
        if self._h_last is None or depth == 0:
            return DraftTree.chain([root])
        width = max(1, min(self.width, (budget - 1) // depth))
        state = {"h": self._h_last, "past": self._kv, "pos": self._c}

        def step(token: int) -> torch.Tensor:  # drafted step j >= 2: (token, previous h) at the next position
            x = self.head.step_input(self.embed(torch.tensor([[token]])).to(self.dtype), state["h"])
            h, own = self.head.run(x, torch.tensor([[state["pos"]]]), state["past"], None)
            state["past"] = [(torch.cat([pk, ok], 2), torch.cat([pv, ov], 2))
                             for (pk, pv), (ok, ov) in zip(state["past"], own)]
            state["h"], state["pos"] = h, state["pos"] + 1
            return self._logp(h)

        d2t = self.d2t.tolist() if self.d2t is not None else None
        tree = build_chain_with_siblings(root, self._logp(self._h_last), step, depth, width, token_map=d2t,
                                         min_prob=self.min_prob)
        tree.meta["drafter"] = self.name
        return tree
