"""Sampling parameters and the one logit warp shared by plain sampling and verification.

Speculative decoding is lossless only with respect to the distribution that plain
sampling would use, so every code path (autoregressive sampling, every acceptance
rule, the tests' exact reference) goes through `warp_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A generator seeded with `seed` (non-deterministically when seed is None)."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target probabilities (..., V) after warping, in a fixed order (as HF generate):

    temperature -> top-k -> top-p -> min-p. Greedy returns a one-hot on the argmax
    (first index on ties), so greedy is the T -> 0 limit and every rule still applies.
    Computed in float64 if the logits are float64, else float32.
    """
    params.validate()
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    if params.is_greedy:
        out = torch.zeros_like(x)
        return out.scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    x = x / params.temperature
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=x.device)
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = torch.where(x < kth, neg_inf, x)  # ties with the k-th value are kept (HF)
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sp, dim=-1) - sp
        drop_sorted = mass_before >= params.top_p  # smallest top set with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, si, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs.amax(-1, keepdim=True)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (..., V) -> (...) int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator)
    return out.reshape(probs.shape[:-1])
