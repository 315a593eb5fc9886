"""Non-anticipating verify gates (the statistical DSpark check is in test_verify_lossless.py)."""

from __future__ import annotations

import inspect

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.tree import VerifyCostModel
from paratree.verify import expected_chain_tokens, prefix_length_from_confidence

conf_st = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(conf_st)
def test_expected_chain_tokens(conf):
    e = expected_chain_tokens(torch.tensor(conf, dtype=torch.float64)).tolist()
    for n in range(len(conf) + 1):
        ref, reach = 1.0, 1.0
        for c in conf[:n]:
            reach *= c
            ref += reach
        assert abs(e[n] - ref) < 1e-12


@settings(max_examples=80, deadline=None)
@given(conf_st, st.floats(0.0, 1.0))
def test_threshold_mode_is_the_longest_confident_prefix(conf, thr):
    n = int(prefix_length_from_confidence(torch.tensor(conf, dtype=torch.float64), threshold=thr))
    reach, ref = 1.0, 0
    for c in conf:
        reach *= c
        if reach < thr:
            break
        ref += 1
    assert n == ref


@settings(max_examples=80, deadline=None)
@given(conf_st, st.floats(0.0, 0.5), st.floats(0.0, 2.0))
def test_cost_mode_maximises_tokens_per_second(conf, slope, draft_s):
    cost = VerifyCostModel([(1, 1.0), (4, 1.0 + 3 * slope), (8, 1.0 + 10 * slope)])
    c = torch.tensor(conf, dtype=torch.float64)
    n = int(prefix_length_from_confidence(c, cost, draft_seconds=draft_s))
    e = expected_chain_tokens(c)
    obj = [float(e[k]) / (draft_s + cost(k + 1)) for k in range(len(conf) + 1)]
    assert obj[n] == max(obj) and n == obj.index(max(obj))


def test_batched_and_no_token_argument():
    conf = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    batched = prefix_length_from_confidence(conf, threshold=0.3)
    assert batched.shape == (5,)
    assert batched.tolist() == [int(prefix_length_from_confidence(c, threshold=0.3)) for c in conf]
    # the gate cannot anticipate: it is never given the drafted tokens
    assert "token" not in " ".join(inspect.signature(prefix_length_from_confidence).parameters)
