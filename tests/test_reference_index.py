"""The n-gram reference index, on worked examples."""

from __future__ import annotations

import pytest

from ragdec.decoding.reference_index import ReferenceIndex


def test_docstring_example():
    index = ReferenceIndex(trigger_n=1, max_n=2)
    index.add([7, 8, 9, 7, 8, 5])
    match = index.lookup([1, 7, 8], copy_k=3)
    assert match.match_len == 2 and match.continuation == (5,)  # tie on count: newest wins
    match = index.lookup([3, 9], copy_k=3)
    assert match.match_len == 1 and match.continuation == (7, 8, 5)


def test_prefers_longest_match():
    index = ReferenceIndex(trigger_n=1, max_n=3)
    index.add([1, 2, 3, 4, 5])
    index.add([9, 2, 3, 6, 7])
    # (2, 3) occurs in both; (1, 2, 3) only in the first
    assert index.lookup([1, 2, 3], copy_k=2).continuation == (4, 5)
    assert index.lookup([9, 2, 3], copy_k=2).continuation == (6, 7)
    assert index.lookup([8, 2, 3], copy_k=2).match_len == 2


def test_prefers_most_frequent_continuation_then_most_recent():
    index = ReferenceIndex(trigger_n=2, max_n=2)
    index.add([1, 2, 5, 0, 1, 2, 5, 0, 1, 2, 6])
    assert index.lookup([1, 2], copy_k=1).continuation == (5,)  # 5 twice beats 6 once
    index.add([1, 2, 6, 1, 2, 6])
    assert index.lookup([1, 2], copy_k=1).continuation == (6,)  # now 6 three times


def test_incremental_extend_indexes_new_ngrams_only_with_a_continuation():
    index = ReferenceIndex(trigger_n=2, max_n=2)
    seq = index.add([4, 5])
    assert index.lookup([4, 5], copy_k=2) is None  # (4, 5) has nothing after it yet
    index.extend(seq, [6, 7])
    assert index.lookup([4, 5], copy_k=2).continuation == (6, 7)
    assert index.lookup([5, 6], copy_k=5).continuation == (7,)


def test_copy_is_limited_by_copy_k_and_short_context():
    index = ReferenceIndex(trigger_n=2, max_n=4)
    index.add(list(range(20)))
    assert index.lookup([3, 4], copy_k=3).continuation == (5, 6, 7)
    assert index.lookup([4], copy_k=3) is None  # context shorter than trigger_n
    assert index.lookup([], copy_k=3) is None


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="trigger_n"):
        ReferenceIndex(trigger_n=3, max_n=2)
