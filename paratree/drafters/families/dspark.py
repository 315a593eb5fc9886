"""DSpark: a bidirectional backbone, a low-rank Markov head over the previous chain token and a
confidence head; the chain's length is chosen by a non-anticipating gate over the verify cost curve."""

import torch
import torch.nn.functional as F

from ..dspark_drafter import DSparkDrafter
from ..heads.dspark import DSparkHead
from ..heads.dspark_format import is_dspark_dir, read_dspark_config, read_dspark_state
from ..heads.training import dspark_loss, head_hidden
from ..registry import (BuildContext, CheckpointFormat, DrafterSpec, HeadFamily, load_family_head, register_drafter,
                        register_family, register_format)


class DSpark(HeadFamily):
    name, causal, drafter, head_class = "dspark", False, "dspark", DSparkHead

    def head_config(self, tcfg, train_cfg, **kw):
        hcfg = super().head_config(tcfg, train_cfg, **kw)
        hcfg.extra["markov_rank"] = train_cfg.markov_rank
        return hcfg

    def draft_logits(self, head, taps, seq, anchors, toks, idx, embed_w, lm_w):
        h = head_hidden(head, taps, anchors, toks.to(taps.device), embed_w)
        prev = torch.tensor(seq["ids"], device=taps.device)[idx]  # previous chain token, teacher-forced
        return head.sequential(h, lambda x: F.linear(x, lm_w.to(x.dtype)), prev)

    def loss(self, draft, aux, target, sup, cfg):  # its own mix; `cfg.loss` is unused
        loss, accept = dspark_loss(draft, aux, target, sup)
        return loss, (aux.detach().float(), accept)

    def card_loss(self, cfg, tc, summary):
        cal = summary["final"].get("calibration") or {}
        ece = summary["final"].get("eval_ece")
        return (f"- Loss: 0.1 CE + 0.9 TV on the drafts, plus BCE of the confidence head toward 1 - TV; "
                f"Markov head rank {tc.get('markov_rank')}"
                + (f"; held-out confidence ECE {ece:.3f}" if ece is not None else "")
                + (f", temperature-scaled (T = {cal['conf_temperature']:.3f}, ECE after {cal['ece_after']:.3f})"
                   if cal else "") + ".")


def build(ctx: BuildContext) -> DSparkDrafter:
    head, _ = load_family_head(ctx, "dspark", "dspark")
    lm = ctx.lm
    return DSparkDrafter(head, lm.model.embed, lm.model.lm_head, name="dspark", cost=ctx.cost, **ctx.options)


register_family(DSpark())
register_format(CheckpointFormat("DSpark", is_dspark_dir, read_dspark_config, read_dspark_state))
register_drafter(DrafterSpec("dspark", build, family="dspark", tree=False,
                             help="DSpark head: Markov chain, confidence-gated length"))
