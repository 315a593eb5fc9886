"""Drafting with a DSpark head: one backbone pass, then a cheap sequential chain with a
non-anticipating, hardware-aware length gate.

At depth k the drafter knows x_0..x_{k-1} and the calibrated confidence
c_k = P(depth k accepted | depth k-1 was), which depends on x_{k-1} but not
on x_k. Before drafting x_k it decides whether position k is worth verifying:
with a measured verify cost curve T(n), it extrapolates the survival
S_k = c_1...c_k geometrically with c_k and admits x_k only if the best
prefix length under that extrapolation reaches k (expected tokens per second,
DSpark's tau x SPS); once it stops it never resumes. Without a cost curve it
stops where S_k drops below a threshold. Either way the choice to verify x_k is
made before x_k is drawn, so sampling stays lossless (gate.py's counter-example).
"""

from __future__ import annotations

import torch

from ..tree.builders import build_chain
from ..tree.cost import VerifyCostModel
from ..tree.draft_tree import DraftTree
from ..verify.gate import admit_next
from .block_drafter import BlockHeadDrafter
from .heads.dspark import DSparkHead


class DSparkDrafter(BlockHeadDrafter):
    def __init__(self, head: DSparkHead, embed, lm_head, name: str = "dspark", max_depth: int | None = None,
                 cost: VerifyCostModel | None = None, threshold: float = 0.1):
        super().__init__(head, embed, lm_head, name=name, tree=False, width=1, max_depth=max_depth)
        # The parent's draft-vocab projection (packed where the drafter is), not a second copy of it.
        dt = embed.weight.dtype
        self._project = lambda x: self.lm_head(x.to(dt)).to(x.dtype)
        self.cost, self.threshold = cost, threshold
        self.last_confidences: list[float] = []  # of the positions admitted in the last round

    @torch.inference_mode()
    def propose(self, tokens: list[int], budget: int) -> DraftTree:
        root = tokens[-1]
        max_len = max(0, min(self.max_depth, budget - 1))
        if max_len == 0:
            return DraftTree.chain([root])
        h = self.block_hidden(root)
        head, t = self.head, self.head.conf_temperature
        chain, logps, confs = [], [], []
        prev, expected, survival = root, 1.0, 1.0
        for k in range(1, max_len + 1):
            logits, conf_logit = head.sequential(h[k - 1], self._project, torch.tensor(prev))
            c = float(torch.sigmoid(conf_logit.float() / t))
            survival *= c
            if not admit_next(expected, survival, c, k, max_len, self.cost, self.threshold):
                break
            logp = torch.log_softmax(logits.float(), -1)
            idx = int(logp.argmax())
            prev = idx if self.d2t is None else int(self.d2t[idx])
            chain.append(prev)
            logps.append(float(logp[idx]))
            confs.append(c)
            expected += survival
        self.last_confidences = confs
        tree = build_chain(root, chain, logps=torch.tensor(logps), q=None)
        tree.meta["drafter"] = self.name
        return tree
