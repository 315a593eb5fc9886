"""DFlash: a bidirectional block head; its chain (dflash) or DDTree's best-first tree over its marginals."""

from ..block_drafter import BlockHeadDrafter
from ..lookup_merge import with_lookup
from ..heads.dflash_format import is_dflash_dir, read_dflash_config, read_dflash_state
from ..registry import CheckpointFormat, DrafterSpec, HeadFamily, register_drafter, register_family, register_format


class DFlash(HeadFamily):
    name, causal, drafter = "dflash", False, "ddtree"


register_family(DFlash())
# z-lab's DFlash layout; a causal one (`dflash_config.causal`) is read as a JetSpec head
register_format(CheckpointFormat("DFlash", is_dflash_dir, read_dflash_config, read_dflash_state))
register_drafter(DrafterSpec("dflash", lambda ctx: BlockHeadDrafter.for_family(ctx, "dflash", "dflash", False),
                             family="dflash", tree=False, help="DFlash head, argmax chain"))
register_drafter(with_lookup(register_drafter(DrafterSpec(
    "ddtree", lambda ctx: BlockHeadDrafter.for_family(ctx, "dflash", "ddtree", True), family="dflash",
    help="DDTree: best-first tree over the DFlash head's marginals"))))
