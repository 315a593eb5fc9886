"""`paratree export`: trained heads written in the checkpoint formats other engines load.

One module per format. A head is exported only as the same function: where its architecture
differs from what the format can express, the export refuses and names the difference
(docs/export_formats_notes.md §5 lists them), it never approximates.
"""

from .dflash import export_dflash
from .dspark import export_dspark
from .eagle3 import export_eagle3

FORMATS = ("dspark", "dflash", "eagle3")
_WRITERS = {"dspark": export_dspark, "dflash": export_dflash, "eagle3": export_eagle3}


def export_head(head_dir, fmt: str, out_dir, lm=None, mask_token_id: int | None = None):
    """Write the head at `head_dir` as `fmt` into `out_dir` (`lm`: its loaded target); returns the directory."""
    if fmt in _WRITERS:
        return _WRITERS[fmt](head_dir, out_dir, lm=lm, mask_token_id=mask_token_id)
    raise ValueError(f"unknown format '{fmt}': choose from {', '.join(FORMATS)}")
