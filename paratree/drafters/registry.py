"""The registry of drafters and head families: the one place that says what a family is.

A family module (`drafters/families/<name>.py`) registers its drafters (`DrafterSpec`: name,
tree mode, how it is built, how the server gives each sequence its own) and, for trained heads,
its `HeadFamily` (head class and config, training hooks, model-card lines). `make_drafter`,
the trainer, the card writer, bench and the server look names up here and never branch on a
family's name, so adding a family is one new file in `families/` plus its training config.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.transformer import linear_kernels, pack_linears_for_inference
from ..tree.cost import VerifyCostModel
from .base import Drafter
from .heads.block import BlockDraftHead, BlockHeadConfig
from .heads.training import LOSSES, build_blocks, head_hidden, sample_anchors

HEADS_DIR = Path(__file__).resolve().parent.parent / "heads"


@dataclass
class BuildContext:
    """What a drafter is built from: the loaded target, options, and the engine's cost curve."""

    lm: object  # models.loader.LoadedModel
    head_path: Path | None = None
    width: int = 8
    cost: VerifyCostModel | None = None  # this machine's verify latency T(n), when calibrated
    options: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.model.parameters()).dtype


@dataclass(frozen=True)
class DrafterSpec:
    """One drafter name. `build(ctx)` makes it; `fork` is how the server gives each sequence its own:
    "copy" shares the loaded weights (per-sequence state is reset by `begin`), "fresh" builds anew."""

    name: str
    build: Callable[[BuildContext], Drafter]
    family: str | None = None  # head family it needs (None: training-free)
    tree: bool = True  # drafts trees (False: chains)
    fork: str = "copy"
    help: str = ""


class HeadFamily:
    """A family of trained heads. The defaults are the block head's (JetSpec/DFlash): a block of
    mask tokens after each anchor, drafted in one pass, trained against the target's distribution
    at every block row. Families override what differs."""

    name = ""
    head_class: type = BlockDraftHead
    causal = True  # block-causal attention inside the block (False: bidirectional)
    drafter = ""  # the drafter a head directory of this family runs as (`generate --head DIR`)
    target_offset = 0  # the target row supervising block row i sits at anchor + i + target_offset

    # -- the head --------------------------------------------------------------------------
    def head_config(self, tcfg, train_cfg, **kw) -> BlockHeadConfig:
        hcfg = BlockHeadConfig.for_target(tcfg, family=self.name, **kw)
        hcfg.causal = self.causal
        return hcfg

    def new_head(self, hcfg: BlockHeadConfig):
        return self.head_class(hcfg)

    def load_head(self, path, dtype: torch.dtype = torch.float32):
        """paratree's own head directory, or a checkpoint in a registered engine format (imported as is)."""
        fmt = checkpoint_format(path)
        if fmt is None:
            return self.head_class.load(path, dtype=dtype)
        cfg = fmt.read_config(path)
        return self.head_class(cfg).fill(fmt.read_state(path, cfg), dtype,
                                         f"'{path}': the {fmt.name} weights do not fit its config.json")

    # -- training hooks (train.trainer drives them) -------------------------------------------
    def init_head(self, head, lm) -> None:
        """Initialise what a fresh head takes from its target (after its draft vocab `d2t` is chosen)."""

    def training_rows(self, seq: dict, depth: int, cfg, gen: torch.Generator, unmask_prob: float):
        """(anchors, block tokens or None, (A, D) supervision weights) for one sequence."""
        anchors = sample_anchors(len(seq["ids"]), seq["prompt_len"], cfg.anchors_per_seq, gen)
        toks, sup = build_blocks(seq["ids"], anchors, depth, unmask_prob, gen)
        return anchors, toks, sup

    def draft_logits(self, head, taps: torch.Tensor, seq: dict, anchors, toks, idx: torch.Tensor,
                     embed_w: torch.Tensor, lm_w: torch.Tensor):
        """(draft logits (A, D, V), auxiliary output or None) for the rows `training_rows` chose."""
        h = head_hidden(head, taps, anchors, toks.to(taps.device), embed_w)
        return F.linear(h, lm_w.to(h.dtype)), None

    def loss(self, draft, aux, target, sup, cfg):
        """(summed loss, confidence rows for calibration or None)."""
        fn = LOSSES[cfg.loss]
        if cfg.loss == "kl":
            return fn(draft, target, sup, cfg.kl_temperature), None
        if cfg.loss == "ce_decay":
            return fn(draft, target, sup, cfg.gamma), None
        return fn(draft, target, sup), None

    # -- model card ------------------------------------------------------------------------
    card_shares = "shares the target's embedding and LM head"  # what the head borrows from its target

    def card_architecture(self, cfg: dict) -> str:
        return (f"block size {cfg['block_size']} ({cfg['block_size']} depths per pass), "
                f"{'block-causal' if cfg['causal'] else 'bidirectional'} block attention")

    def card_rows_per_sequence(self, tc: dict) -> str:
        return f"{tc['anchors_per_seq']} anchors"

    def card_loss(self, cfg: dict, tc: dict, summary: dict) -> str:
        return (f"- Loss: {tc['loss']}" + (f" (temperature {tc['kl_temperature']})" if tc["loss"] == "kl" else
                                          f" (gamma {tc['gamma']})" if tc["loss"] == "ce_decay" else "")
                + (f"; un-masked prefix probability {tc['unmask_prob']}" if tc.get("unmask_prob") else ""))


@dataclass(frozen=True)
class CheckpointFormat:
    """Another engine's head checkpoint layout that `--head DIR` reads (`paratree export` writes it)."""

    name: str
    detect: Callable[[Path], bool]
    read_config: Callable[[Path], BlockHeadConfig]
    read_state: Callable[[Path, BlockHeadConfig], dict]


_DRAFTERS: dict[str, DrafterSpec] = {}
_FAMILIES: dict[str, HeadFamily] = {}
_FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def checkpoint_format(path) -> CheckpointFormat | None:
    """The engine format a head directory is in; None for paratree's own (`head_config.json`)."""
    return next((f for f in _FORMATS.values() if f.detect(Path(path))), None)


def register_drafter(spec: DrafterSpec) -> DrafterSpec:
    if spec.fork not in ("copy", "fresh"):
        raise ValueError(f"drafter '{spec.name}': fork must be 'copy' or 'fresh'")
    _DRAFTERS[spec.name] = spec
    return spec


def register_family(family: HeadFamily) -> HeadFamily:
    if not family.name or not family.drafter:
        raise ValueError("a head family needs a name and the drafter its heads run as")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Drop a drafter or family name (tests register toy families and clean up after)."""
    _DRAFTERS.pop(name, None)
    _FAMILIES.pop(name, None)


def drafter_names() -> tuple[str, ...]:
    return tuple(_DRAFTERS)


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def drafter_spec(name: str) -> DrafterSpec:
    try:
        return _DRAFTERS[name]
    except KeyError:
        raise ValueError(f"unknown drafter '{name}': choose from {', '.join(_DRAFTERS)}") from None


def head_family_of(name: str) -> HeadFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown head family '{name}': choose from {', '.join(_FAMILIES)}") from None


def shipped_head(model_name: str, family: str) -> Path | None:
    """The head shipped in the package for a packaged model, if any."""
    p = HEADS_DIR / model_name / family
    return p if (p / "head_config.json").is_file() else None


def read_head_config(path) -> BlockHeadConfig:
    """A head directory's config: paratree's own (`head_config.json`) or an imported checkpoint format."""
    fmt = checkpoint_format(path)
    return fmt.read_config(path) if fmt else BlockDraftHead.read_config(path)


def load_family_head(ctx: BuildContext, family: str, drafter: str):
    """(head, packed): the `family` head for `ctx.lm`, from `ctx.head_path`, else the shipped one, checked
    against the target; its Linears get the target's packed CPU kernels unless the target runs stock ones
    (a D+1-row head pass is where stock fp32 kernels are slowest)."""
    path = Path(ctx.head_path) if ctx.head_path else shipped_head(ctx.lm.name, family)
    if path is None:
        raise ValueError(f"no trained {family} head ships for model '{ctx.lm.name}': train one with "
                         f"`paratree train --config configs/{family}_smollm2.yaml` and pass --head DIR")
    found = read_head_config(path).family
    if found != family:
        raise ValueError(f"'{path}' holds a {found} head; drafter '{drafter}' needs a {family} head")
    head = head_family_of(family).load_head(path, dtype=ctx.dtype)
    head.check_target(ctx.lm.config, ctx.lm.tokenizer)
    route = getattr(ctx.lm.model, "kernel_route", None)
    packed = (linear_kernels(ctx.lm.model)[0].removeprefix("inductor-") != "stock"
              and pack_linears_for_inference(head, route))
    return head, bool(packed)


def fork(spec: DrafterSpec, proto: Drafter, build: Callable[[], Drafter]) -> Callable[[], Drafter]:
    """The server's per-sequence drafter factory for `spec`, given a built prototype."""
    if spec.fork == "fresh":
        return build
    return lambda: copy.copy(proto)
