"""EAGLE-3-style autoregressive head: one decoder layer over [token embedding ; fused taps],
trained by training-time test, drafted as a chain with top-k siblings per depth."""

import torch

from ..eagle_drafter import EagleDrafter
from ..heads.eagle import EagleHead, eagle_train_logits
from ..registry import BuildContext, DrafterSpec, HeadFamily, load_family_head, register_drafter, register_family


class Eagle(HeadFamily):
    name, causal, drafter, head_class = "eagle", True, "eagle", EagleHead
    target_offset = 1  # state t reads x_{t+1}; step j predicts the target's distribution at t + j

    def head_config(self, tcfg, train_cfg, **kw):
        if not kw.get("root_in", True):
            raise ValueError("an eagle head's step input is its root projection: root_in must stay true")
        return super().head_config(tcfg, train_cfg, **kw)

    def training_rows(self, seq, depth, cfg, gen, unmask_prob):
        n = len(seq["ids"])
        t = torch.arange(n - 1).view(-1, 1) + torch.arange(1, depth + 1).view(1, -1)
        valid = (t <= n - 2) & (t >= seq["prompt_len"] - 1)  # a response token exists to predict
        decay = cfg.ttt_decay ** torch.arange(depth, dtype=torch.float32)
        return list(range(n - 1)), None, valid.float() * decay

    def draft_logits(self, head, taps, seq, anchors, toks, idx, embed_w, lm_w):
        steps = eagle_train_logits(head, taps, seq["ids"], embed_w, lm_w, head.cfg.depth)
        return torch.stack(steps, dim=1), None  # (T-1, D, V)

    def card_rows_per_sequence(self, tc):
        return "every position"

    def card_architecture(self, cfg):
        return (f"autoregressive over [token embedding ; fused taps], "
                f"{cfg['block_size']} training-time-test steps")


def build(ctx: BuildContext) -> EagleDrafter:
    head, _ = load_family_head(ctx, "eagle", "eagle")
    lm = ctx.lm
    return EagleDrafter(head, lm.model.embed, lm.model.lm_head.weight, name="eagle", width=min(ctx.width, 4),
                        **ctx.options)


register_family(Eagle())
register_drafter(DrafterSpec("eagle", build, family="eagle",
                             help="EAGLE-3-style head: chain + top-k siblings per depth"))
