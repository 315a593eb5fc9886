"""`paratree export`: trained heads written in the checkpoint formats other engines load.

One module per format. A head is exported only as the same function: where its architecture
differs from what the format can express, the export refuses and names the difference
(docs/export_formats_notes.md §5 lists them), it never approximates.
"""

from .dspark import export_dspark

FORMATS = ("dspark", "dflash", "eagle3")


def export_head(head_dir, fmt: str, out_dir, lm=None, mask_token_id: int | None = None):
    """Write the head at `head_dir` as `fmt` into `out_dir` (`lm`: its loaded target); returns the directory."""
    if fmt == "dspark":
        return export_dspark(head_dir, out_dir, lm=lm, mask_token_id=mask_token_id)
    if fmt in FORMATS:
        raise ValueError(f"--format {fmt} is not written yet: the shipped heads differ from it (a learned mask, "
                         f"per-tap norms, a root projection, anchor-first rows; docs/export_formats_notes.md §5); "
                         f"--format dspark exports a DSpark head trained with tap_norm: false and root_in: false")
    raise ValueError(f"unknown format '{fmt}': choose from {', '.join(FORMATS)}")
