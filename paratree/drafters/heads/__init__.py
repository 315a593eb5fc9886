"""Trained draft heads, one module per family; `head_class` maps a family name to its class."""

from __future__ import annotations


def head_class(family: str):
    """The nn.Module class that holds (and loads) a head of this family."""
    from .block import BlockDraftHead
    from .dspark import DSparkHead
    from .eagle import EagleHead

    return {"eagle": EagleHead, "dspark": DSparkHead}.get(family, BlockDraftHead)
