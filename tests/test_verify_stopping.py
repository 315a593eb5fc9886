"""EOS / budget truncation of emitted tokens and stop strings."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratree.verify import StopStrings, truncate_emitted, truncate_emitted_batch


def test_truncate_examples():
    assert truncate_emitted([5, 2, 7], {2}, 10) == ([5, 2], True)
    assert truncate_emitted([5, 6, 7], {2}, 10) == ([5, 6, 7], False)
    assert truncate_emitted([5, 6, 7], {2}, 2) == ([5, 6], True)
    assert truncate_emitted([5, 6, 2], {2}, 2) == ([5, 6], True)
    assert truncate_emitted([2, 2], {2, 9}, 5) == ([2], True)
    assert truncate_emitted([1], set(), 0) == ([], True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), min_size=1, max_size=6),
       st.sets(st.integers(0, 4), max_size=2), st.integers(0, 7))
def test_batch_matches_list_version(rows, eos, remaining):
    L = max(map(len, rows))
    toks = torch.tensor([r + [-1] * (L - len(r)) for r in rows])
    keep, fin = truncate_emitted_batch(toks, eos, remaining)
    for i, r in enumerate(rows):
        kept, finished = truncate_emitted(r, eos, remaining)
        assert int(keep[i]) == len(kept) and bool(fin[i]) == finished


def test_batch_per_row_remaining():
    toks = torch.tensor([[1, 2, 3], [1, 2, -1]])
    keep, fin = truncate_emitted_batch(toks, {9}, torch.tensor([2, 5]))
    assert keep.tolist() == [2, 2] and fin.tolist() == [True, False]


def test_stop_strings():
    s = StopStrings(["\n\n", "END", ""])
    assert s.find("abc END x\n\n") == 4
    assert s.find("abc") is None
    assert s.find("END END", start=1) == 4
    assert s.safe_len("hello EN") == len("hello ")  # "EN" may become "END"
    assert s.safe_len("hello\n") == len("hello")
    assert s.safe_len("hello END more") == len("hello ")
    assert s.safe_len("hello") == 5
    assert StopStrings(None).safe_len("abc") == 3
