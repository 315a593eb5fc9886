"""Prompt lookup: continuations of earlier n-gram matches in the context (training-free)."""

from ..ngram import NGramDrafter
from ..registry import DrafterSpec, register_drafter

register_drafter(DrafterSpec("ngram", lambda ctx: NGramDrafter(tree=True, **ctx.options), fork="fresh",
                             help="prompt lookup, every match's continuation merged into a trie"))
register_drafter(DrafterSpec("ngram-chain", lambda ctx: NGramDrafter(tree=False, **ctx.options), tree=False,
                             fork="fresh", help="prompt lookup, the longest match's continuation only"))
