"""Draft trees: the shared type, builders and hardware-aware sizing."""

from paratree.tree.builders import (
    AcceptanceProfile,
    build_best_first,
    build_chain,
    profile_caps,
    top2gap_caps,
)
from paratree.tree.cost import (
    VerifyCostModel,
    expected_accepted,
    path_accept_prob,
    size_tree,
    subtree_prefix,
)
from paratree.tree.draft_tree import DraftTree

__all__ = [
    "AcceptanceProfile", "build_best_first", "build_chain", "profile_caps", "top2gap_caps",
    "VerifyCostModel", "expected_accepted", "path_accept_prob", "size_tree", "subtree_prefix", "DraftTree",
]
