"""Lossless verification: logit warping, acceptance rules, stopping, verify gates."""

from paratree.verify.accept import (
    AcceptResult,
    BatchAcceptResult,
    accept,
    accept_batch,
    accept_chain_rejection,
    accept_greedy,
    accept_specinfer,
    accept_target_sample,
    child_accept_probs,
    choose_method,
    resolve_rule,
    stack_trees,
)
from paratree.verify.gate import expected_chain_tokens, prefix_length_from_confidence
from paratree.verify.stopping import StopStrings, truncate_emitted, truncate_emitted_batch
from paratree.verify.warp import SamplingParams, sample, warp_probs

__all__ = [
    "AcceptResult", "BatchAcceptResult", "accept", "accept_batch", "accept_chain_rejection",
    "accept_greedy", "accept_specinfer", "accept_target_sample", "child_accept_probs",
    "choose_method", "resolve_rule", "stack_trees", "expected_chain_tokens", "prefix_length_from_confidence",
    "StopStrings", "truncate_emitted", "truncate_emitted_batch", "SamplingParams", "sample", "warp_probs",
]
