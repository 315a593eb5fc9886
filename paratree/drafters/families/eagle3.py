"""EAGLE-3 exactly as SpecForge, vLLM, SGLang and llama.cpp define it (heads/eagle3.py): the head that
`paratree export --format eagle3` writes and that `--head DIR` reads back from that layout. Trained and
drafted as paratree's own EAGLE head (training-time test; chain plus top-k siblings)."""

import torch

from ..eagle_drafter import EagleDrafter
from ..heads.eagle3 import Eagle3Head
from ..heads.eagle3_format import is_eagle3_dir, read_eagle3_config, read_eagle3_state
from ..registry import (BuildContext, CheckpointFormat, DrafterSpec, load_family_head, register_drafter,
                        register_family, register_format)
from .eagle import Eagle


class Eagle3(Eagle):
    name, drafter, head_class = "eagle3", "eagle3", Eagle3Head
    card_shares = "shares the target's embedding, has its own LM head"

    def head_config(self, tcfg, train_cfg, **kw):
        if kw.get("num_layers", 1) != 1:
            raise ValueError("an EAGLE-3 head has exactly one decoder layer (num_layers: 1)")
        kw.update(tap_norm=False, root_in=False, num_taps=3)  # the format: fc over exactly 3 raw taps
        hcfg = super(Eagle, self).head_config(tcfg, train_cfg, **kw)
        n = tcfg.num_layers
        if len(hcfg.tap_layers) != 3:  # a shallow target: its first, middle and last layers
            hcfg.tap_layers = tuple(sorted({0, n // 2, n - 1}))
        if len(hcfg.tap_layers) != 3:
            raise ValueError(f"an EAGLE-3 head reads 3 distinct target layers; the target has {n}")
        return hcfg

    def init_head(self, head, lm):
        with torch.no_grad():  # the draft LM head starts as the target's rows over the draft vocab
            head.lm_head.weight.copy_(head.target_rows(lm.model.lm_head.weight.detach().float()))

    def card_architecture(self, cfg):
        return (f"EAGLE-3 (one layer over [input_layernorm(embedding) ; hidden_norm(fc(taps))], own LM head), "
                f"{cfg['block_size']} training-time-test steps")


def build(ctx: BuildContext, name: str = "eagle3", width: int = 4) -> EagleDrafter:
    head, _ = load_family_head(ctx, "eagle3", name)
    lm = ctx.lm
    return EagleDrafter(head, lm.model.embed, lm.model.lm_head.weight, name=name, width=min(ctx.width, width),
                        **ctx.options)


register_family(Eagle3())
register_format(CheckpointFormat("EAGLE-3", is_eagle3_dir, read_eagle3_config, read_eagle3_state))
register_drafter(DrafterSpec("eagle3", build, family="eagle3",
                             help="EAGLE-3 head in the engines' format: chain + top-k siblings per depth"))
register_drafter(DrafterSpec("eagle3-chain", lambda ctx: build(ctx, "eagle3-chain", 1), family="eagle3", tree=False,
                             help="EAGLE-3 head, greedy chain (what llama.cpp's draft-eagle3 drafts)"))
