"""Plain decoding: the tree is only the root, through the same loop as every drafter."""

from ..base import NoDrafter
from ..registry import DrafterSpec, register_drafter

register_drafter(DrafterSpec("plain", lambda ctx: NoDrafter(), tree=False, fork="fresh",
                             help="no draft: the target alone, one token per forward"))
