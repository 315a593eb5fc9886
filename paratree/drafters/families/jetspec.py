"""JetSpec: a block-causal head drafts [root, MASK x D] in one pass; a best-first tree over its
per-depth distributions (or the path-conditioned refresh, or the chain)."""

from ..block_drafter import BlockHeadDrafter
from ..lookup_merge import with_lookup
from ..registry import DrafterSpec, HeadFamily, register_drafter, register_family


class JetSpec(HeadFamily):
    name, causal, drafter = "jetspec", True, "jetspec"


register_family(JetSpec())
for name, tree, conditioned, text in (
        ("jetspec", True, False, "JetSpec head, best-first tree"),
        ("jetspec-pc", True, True, "JetSpec head, tree refreshed with branch-conditioned distributions"),
        ("jetspec-chain", False, False, "JetSpec head, argmax chain")):
    spec = register_drafter(DrafterSpec(
        name, lambda ctx, n=name, t=tree, c=conditioned: BlockHeadDrafter.for_family(ctx, "jetspec", n, t, c),
        family="jetspec", tree=tree, help=text))
    if tree:
        register_drafter(with_lookup(spec))
