"""A small LM of the target's tokenizer as the drafter, with its own KV cache."""

from __future__ import annotations

from ...models.loader import load_model
from ..draft_model import DraftModelDrafter, check_same_tokenizer
from ..registry import BuildContext, DrafterSpec, register_drafter

# draft up to DRAFT_DEPTH tokens, stopping at the first one the draft model itself gives less than
# DRAFT_MIN_PROB (HF assisted generation's assistant_confidence_threshold); staged drafting: the
# draft model checks up to DRAFT_LOOKUP prompt-lookup tokens in one forward first.
DRAFT_DEPTH = 10
DRAFT_MIN_PROB = 0.4
DRAFT_LOOKUP = 8
_DRAFT_LMS: dict = {}


def draft_lm(spec: str, dtype):
    """The draft model `spec`, loaded once per process (bench builds the drafter for every budget
    and its hf-assisted peer runs on the same weights)."""
    key = (str(spec), dtype)
    if key not in _DRAFT_LMS:
        _DRAFT_LMS[key] = load_model(spec, dtype)
    return _DRAFT_LMS[key]


def build(ctx: BuildContext) -> DraftModelDrafter:
    opts = dict(ctx.options)
    spec = opts.pop("draft_model", None)
    if not spec:
        raise ValueError("--drafter draft-model needs --draft-model NAME|PATH (a small LM with the target's "
                         "tokenizer, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)")
    small = draft_lm(spec, ctx.dtype)
    check_same_tokenizer(ctx.lm, small)
    return DraftModelDrafter(small, depth=opts.pop("draft_depth", DRAFT_DEPTH), width=opts.pop("draft_width", 1),
                             min_prob=opts.pop("draft_min_prob", DRAFT_MIN_PROB),
                             lookup=opts.pop("draft_lookup", DRAFT_LOOKUP), vocab_size=ctx.lm.config.vocab_size,
                             **opts)


# a fresh drafter per server sequence: its own KV cache (the weights are loaded once and shared)
register_drafter(DrafterSpec("draft-model", build, tree=False, fork="fresh",
                             help="a small LM of the same tokenizer (--draft-model), chain + lookup staging"))
