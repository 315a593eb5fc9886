"""Non-anticipating verify gates: how many chain positions to submit for verification.

Rejection sampling is lossless only if the decision to verify drafted token x_d
does not depend on x_d itself (DSpark's counter-example: admitting x1 only when
x1 = A turns p = (0.7, 0.3) into (0.85, 0.15)). These gates therefore read only
confidences, never tokens:

- cost mode (`cost` given) picks the length maximising expected tokens per second
  over all prefixes at once, so conf must be known before ANY chain token is
  sampled (e.g. per-depth confidences from a parallel draft head);
- threshold mode stops at the first position whose cumulative confidence drops
  below `threshold`, so conf[d] may depend on x_<d (autoregressive drafters) but
  not on x_d or later tokens.
"""

from __future__ import annotations

import torch

from paratree.tree.cost import VerifyCostModel


def expected_chain_tokens(conf: torch.Tensor) -> torch.Tensor:
    """(..., D) per-position acceptance confidences -> (..., D+1) expected tokens per round for n = 0..D positions."""
    c = conf.double()
    reach = torch.cumprod(c, dim=-1)
    return torch.cat([torch.ones_like(c[..., :1]), 1.0 + torch.cumsum(reach, dim=-1)], dim=-1)


def _best_rate(expected: torch.Tensor, lengths: torch.Tensor, cost: VerifyCostModel,
               draft_seconds: float = 0.0) -> torch.Tensor:
    """The prefix length n (of `lengths`) maximising E[n] / (draft_seconds + T(n + 1)); first on ties."""
    t = cost.seconds(lengths + 1).to(torch.float64) + draft_seconds
    return lengths[torch.argmax(expected / t.clamp_min(1e-12), dim=-1)]


def admit_next(expected: float, survival: float, conf: float, k: int, max_len: int,
               cost: VerifyCostModel | None, threshold: float) -> bool:
    """The same gate, decided one position at a time (a sequential drafter, e.g. DSpark's Markov chain):
    verify position k (1-based)? `expected` = 1 + S_1 + ... + S_{k-1}, `survival` = S_k, and `conf`
    (the confidence of position k, known before x_k is drawn) extrapolates the positions after k
    geometrically. Threshold mode: S_k >= threshold."""
    if cost is None:
        return survival >= threshold
    n = torch.arange(k - 1, max_len + 1)  # candidate prefix lengths
    c = min(max(conf, 0.0), 1.0 - 1e-9)
    gain = survival * (1 - c ** (n - (k - 1)).double()) / (1 - c)  # S_k, S_k c, S_k c^2, ... summed
    return int(_best_rate(expected + gain, n, cost)) >= k


def prefix_length_from_confidence(
    conf: torch.Tensor,
    cost: VerifyCostModel | None = None,
    draft_seconds: float = 0.0,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Number of chain positions to verify, (...) int64, from conf (..., D).

    With `cost`: argmax_n E[n] / (draft_seconds + T(n + 1)) (n + 1 nodes incl. the
    root; first max on ties). Otherwise: the longest prefix whose cumulative
    product of confidences stays >= threshold.
    """
    if cost is not None:
        return _best_rate(expected_chain_tokens(conf), torch.arange(conf.shape[-1] + 1), cost, draft_seconds)
    reach = torch.cumprod(conf.double(), dim=-1)
    return (torch.cumprod((reach >= threshold).long(), dim=-1)).sum(-1)
