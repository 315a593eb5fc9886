"""Drafters behind one protocol; `make_drafter` builds one by name."""

from __future__ import annotations

from pathlib import Path

from .base import Drafter, NoDrafter
from .ngram import NGramDrafter

HEADS_DIR = Path(__file__).resolve().parent.parent / "heads"
# name -> (head family it needs, tree?, path-conditioned refresh?)
HEAD_DRAFTERS = {
    "jetspec": ("jetspec", True, False),
    "jetspec-pc": ("jetspec", True, True),  # path-conditioned refresh of the best-first tree
    "jetspec-chain": ("jetspec", False, False),
    "dflash": ("dflash", False, False),
    "ddtree": ("dflash", True, False),
    "eagle": ("eagle", True, False),  # EAGLE-3-style AR head: chain + top-k siblings per depth
    "dspark": ("dspark", False, False),  # parallel backbone + Markov chain + confidence-gated length
}
# "<head drafter>+ngram": the head's tree with prompt-lookup continuations grafted on (lookup_merge.py)
MERGED_DRAFTERS = ("jetspec+ngram", "jetspec-pc+ngram", "ddtree+ngram")
DRAFTERS = ("plain", "ngram", "ngram-chain", "draft-model", *HEAD_DRAFTERS, *MERGED_DRAFTERS)


_DRAFT_LMS: dict = {}
# draft-model defaults: draft up to DRAFT_DEPTH tokens, stopping at the first one the draft model
# itself gives less than DRAFT_MIN_PROB (HF assisted generation's assistant_confidence_threshold).
DRAFT_DEPTH = 10
DRAFT_MIN_PROB = 0.4
DRAFT_LOOKUP = 8  # staged drafting: the draft model checks up to 8 prompt-lookup tokens in one forward


def shipped_head(model_name: str, family: str) -> Path | None:
    """The head shipped in the package for a packaged model, if any."""
    p = HEADS_DIR / model_name / family
    return p if (p / "head_config.json").is_file() else None


# The drafter measured fastest per packaged model, where that is not its plain JetSpec head. SmolLM2-135M
# (docs/benchmarks.md, session 11, bf16, 10 prompts x 128 tokens per dataset, one process): the shipped
# JetSpec head with prompt lookup grafted on, jetspec+ngram@auto, is the fastest method on GSM8K (1.85x
# plain; ngram 1.55x, jetspec 1.49x), HumanEval (1.69x; 1.46x, 1.31x) and MT-Bench (1.30x; 1.25x, 1.15x).
# Before the merge (sessions 6-9) prompt lookup alone beat every head on code and chat.
MEASURED_DEFAULT = {"smollm2-135m": "jetspec+ngram"}
HEAD_FAMILY_DRAFTER = {"jetspec": "jetspec", "dflash": "ddtree", "eagle": "eagle", "dspark": "dspark"}


def default_drafter(model_name: str) -> str:
    """The best drafter this model has, by measurement: the recorded one, else its shipped JetSpec
    head, else prompt lookup (training-free)."""
    if model_name in MEASURED_DEFAULT:
        return MEASURED_DEFAULT[model_name]
    return "jetspec" if shipped_head(model_name, "jetspec") else "ngram"


def head_family(name: str) -> str | None:
    """The head family drafter `name` runs on (a merged drafter: its base's), or None for training-free ones."""
    spec = HEAD_DRAFTERS.get(name.removesuffix("+ngram"))
    return spec[0] if spec else None


def drafter_for_head(path: str | Path) -> str:
    """The tree drafter for a trained head directory, by the family it was trained as."""
    from .heads.block import BlockDraftHead

    return HEAD_FAMILY_DRAFTER[BlockDraftHead.read_config(path).family]


def draft_lm(spec: str, dtype):
    """The draft model `spec`, loaded once per process (bench builds the drafter for every budget
    and its hf-assisted peer runs on the same weights)."""
    from ..models.loader import load_model

    key = (str(spec), dtype)
    if key not in _DRAFT_LMS:
        _DRAFT_LMS[key] = load_model(spec, dtype)
    return _DRAFT_LMS[key]


def make_drafter(name: str, lm=None, head_path: str | None = None, width: int = 8, **options) -> Drafter:
    """Build the drafter called `name` for the loaded target `lm`."""
    if name == "plain":
        return NoDrafter()
    if name in MERGED_DRAFTERS:
        from .lookup_merge import LookupMergedDrafter

        return LookupMergedDrafter(make_drafter(name.removesuffix("+ngram"), lm, head_path, width, **options))
    if name == "ngram":
        return NGramDrafter(tree=True, **options)
    if name == "ngram-chain":
        return NGramDrafter(tree=False, **options)
    if name == "draft-model":
        from .draft_model import DraftModelDrafter, check_same_tokenizer

        spec = options.pop("draft_model", None)
        if not spec:
            raise ValueError("--drafter draft-model needs --draft-model NAME|PATH (a small LM with the target's "
                             "tokenizer, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)")
        small = draft_lm(spec, next(lm.model.parameters()).dtype)
        check_same_tokenizer(lm, small)
        return DraftModelDrafter(small, depth=options.pop("draft_depth", DRAFT_DEPTH),
                                 width=options.pop("draft_width", 1), min_prob=options.pop("draft_min_prob", DRAFT_MIN_PROB),
                                 lookup=options.pop("draft_lookup", DRAFT_LOOKUP),
                                 vocab_size=lm.config.vocab_size, **options)
    if name in HEAD_DRAFTERS:
        from .block_drafter import BlockHeadDrafter
        from .heads import head_class
        from .heads.block import BlockDraftHead

        family, tree, conditioned = HEAD_DRAFTERS[name]
        path = Path(head_path) if head_path else shipped_head(lm.name, family)
        if path is None:
            raise ValueError(f"no trained {family} head ships for model '{lm.name}': train one with "
                             f"`paratree train --config configs/{family}_smollm2.yaml` and pass --head DIR")
        dtype = next(lm.model.parameters()).dtype
        found = BlockDraftHead.read_config(path).family
        if found != family:
            raise ValueError(f"'{path}' holds a {found} head; drafter '{name}' needs a {family} head")
        head = head_class(family).load(path, dtype=dtype)
        head.check_target(lm.config, lm.tokenizer)
        from ..models.transformer import linear_kernels, pack_linears_for_inference

        # A D+1-row head pass is where stock fp32 kernels are slowest: pack it like the target.
        route = getattr(lm.model, "kernel_route", None)
        packed = linear_kernels(lm.model)[0].removeprefix("inductor-") != "stock" and pack_linears_for_inference(head, route)
        if family == "dspark":
            from .dspark_drafter import DSparkDrafter

            if "cost" not in options:  # the measured verify curve of this machine, when calibrated
                from ..engine.sizing import get_profile, profile_cost

                prof = get_profile(lm, calibrate_if_missing=False)
                options["cost"] = profile_cost(prof) if prof else None
            return DSparkDrafter(head, lm.model.embed, lm.model.lm_head, name=name, **options)
        if family == "eagle":
            from .eagle_drafter import EagleDrafter

            return EagleDrafter(head, lm.model.embed, lm.model.lm_head.weight, name=name,
                                width=min(width, 4), **options)
        lm_head = lm.model.lm_head if head.d2t is not None else (
            getattr(lm.model, "lm_head_packed", None) or lm.model.lm_head)
        return BlockHeadDrafter(head, lm.model.embed, lm_head, name=name, tree=tree, width=width,
                                path_conditioned=conditioned, pack=packed, route=route, **options)
    raise ValueError(f"unknown drafter '{name}': choose from {', '.join(DRAFTERS)}")


__all__ = ["Drafter", "NoDrafter", "NGramDrafter", "make_drafter", "default_drafter", "drafter_for_head", "head_family",
           "DRAFTERS", "HEAD_DRAFTERS"]
