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
        e = expected_chain_tokens(conf)
        t = cost.seconds(torch.arange(1, conf.shape[-1] + 2)) + draft_seconds
        return torch.argmax(e / t.clamp_min(1e-12), dim=-1)
    reach = torch.cumprod(conf.double(), dim=-1)
    return (torch.cumprod((reach >= threshold).long(), dim=-1)).sum(-1)
