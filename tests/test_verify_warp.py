"""The single logit warp: parameter validation and agreement with HF generate semantics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.verify import SamplingParams, sample, warp_probs


def _reference(row: list[float], p: SamplingParams) -> list[float]:
    """Plain-python HF order: temperature -> top-k -> top-p (ascending cumsum) -> min-p."""
    V = len(row)
    if p.temperature == 0:
        m = max(row)
        i = row.index(m)
        return [1.0 if j == i else 0.0 for j in range(V)]
    x = [v / p.temperature for v in row]
    if 0 < p.top_k < V:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    mx = max(x)
    e = [math.exp(v - mx) for v in x]
    probs = [v / sum(e) for v in e]
    if p.top_p < 1:
        order = sorted(range(V), key=lambda j: probs[j])  # ascending
        cum, removed = 0.0, set()
        for j in order[:-1]:  # the top token is always kept
            cum += probs[j]
            if cum <= 1 - p.top_p:
                removed.add(j)
        probs = [0.0 if j in removed else v for j, v in enumerate(probs)]
        probs = [v / sum(probs) for v in probs]
    if p.min_p > 0:
        thr = p.min_p * max(probs)
        probs = [v if v >= thr else 0.0 for v in probs]
        probs = [v / sum(probs) for v in probs]
    return probs


params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5, 2.0]),
    top_k=st.integers(0, 8),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
)


@settings(max_examples=150, deadline=None)
@given(params_st, st.integers(2, 9), st.integers(0, 2**16))
def test_warp_matches_reference(params, V, seed):
    logits = 2.0 * torch.randn(3, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = warp_probs(logits, params)
    assert got.dtype == torch.float64
    for r in range(3):
        ref = torch.tensor(_reference(logits[r].tolist(), params), dtype=torch.float64)
        assert torch.allclose(got[r], ref, atol=1e-12), (params, logits[r], got[r], ref)
    f32 = warp_probs(logits.float(), params)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), got, atol=1e-5)


def test_warp_shapes_and_normalisation():
    logits = torch.randn(2, 3, 7)
    probs = warp_probs(logits, SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05))
    assert probs.shape == (2, 3, 7)
    assert torch.all(probs >= 0) and torch.allclose(probs.sum(-1), torch.ones(2, 3))


def test_greedy_is_one_hot_first_argmax():
    probs = warp_probs(torch.tensor([1.0, 3.0, 3.0, -1.0]), SamplingParams())
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_keeps_ties_and_masked_logits():
    probs = warp_probs(torch.tensor([2.0, 1.0, 1.0, 0.0, float("-inf")]), SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, True, False, False]


def test_order_temperature_before_top_p():
    # at T=1 the top token alone has mass >= 0.6; at T=2 it does not, so top-p keeps two
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    assert int((warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.6)) > 0).sum()) == 1
    assert int((warp_probs(logits, SamplingParams(temperature=2.0, top_p=0.6)) > 0).sum()) == 2


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
     ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.2}, "top_p"),
     ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p")],
)
def test_validate_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()
    with pytest.raises(ValueError, match=field):
        warp_probs(torch.zeros(3), SamplingParams(**kwargs))


def test_is_greedy_and_seeded_generator():
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy
    p = SamplingParams(temperature=1.0, seed=9)
    probs = torch.softmax(torch.randn(4, 6), -1)
    assert torch.equal(sample(probs, p.make_generator()), sample(probs, p.make_generator()))


def test_sample_draws_from_probs():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = sample(probs.expand(50_000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[1] == 0 and torch.allclose(freq, probs.double(), atol=0.01)
