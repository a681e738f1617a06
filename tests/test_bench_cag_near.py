"""`ragdec bench cag-near` and the copy bound it reports: the oracle's arithmetic on made-up
answers, and a real run (smollm2, the zoo's cache embedder, SQLite) over duplicate pairs
written here."""

from __future__ import annotations

import json

import pytest
from retrieval_fixtures import write_jsonl

from ragdec.bench.copy_bound import copy_speedup_bound, longest_copy


def test_copy_bound_docstring_example():
    assert copy_speedup_bound([5, 6, 7, 8, 9], [[6, 7, 8, 9]], (1.0, 1.2, 1.4, 1.6, 1.8)) == pytest.approx(2.5)


def test_copy_bound_takes_only_what_pays_and_what_is_there():
    seconds = (1.0, 1.5, 2.0, 2.5)
    assert copy_speedup_bound([1, 2, 3, 4], [], seconds) == 1.0  # nothing to copy: greedy
    assert copy_speedup_bound([1, 2, 3, 4], [[2, 3, 4]], (1.0, 3.0, 5.0, 7.0)) == 1.0  # drafts cost more than they bring
    # [1, 2, 1, 2, 1, 2] repeats itself: greedy's 5 decode steps against a step (position 1),
    # a forward drafting [1, 2] from the answer so far (positions 2-4) and a last step
    assert longest_copy([1, 2, 1, 2, 1, 2], 2, []) == 2  # only what is already written can be copied
    assert copy_speedup_bound([1, 2, 1, 2, 1, 2], [], seconds) == pytest.approx(5 / (1.0 + 2.0 + 1.0))
    assert copy_speedup_bound([7], [[7]], seconds) is None  # no decode phase
    # after a one-token match only: in [9, 6, 7, 8] nothing follows a 5, so the copy can
    # start only once 6 is decoded (a step, then [7, 8] drafted); in [5, 6, 7, 8] at once
    seconds = (1.0, 1.2, 1.4, 1.6, 1.8)
    assert copy_speedup_bound([5, 6, 7, 8, 9], [[9, 6, 7, 8]], seconds) == pytest.approx(2.5)
    assert copy_speedup_bound([5, 6, 7, 8, 9], [[9, 6, 7, 8]], seconds, after_last=True) == pytest.approx(4 / 2.4)
    assert copy_speedup_bound([5, 6, 7, 8, 9], [[5, 6, 7, 8]], seconds, after_last=True) == pytest.approx(2.5)
    # the loop's overhead per forward counts for both, and fewer forwards save it too
    assert copy_speedup_bound([5, 6, 7, 8, 9], [[6, 7, 8, 9]], (1.0, 1.2, 1.4, 1.6), overhead=1.0) == pytest.approx(8 / 2.6)


def test_cag_near_bench_on_smollm2(tmp_path, weights):
    from ragdec.app.cli import main

    pairs = [
        {"a": "What is the capital of France?", "b": "Which city is the capital of France?", "duplicate": 1},
        {"a": "How do I learn to play the guitar?", "b": "What is the best way to learn guitar?", "duplicate": 1},
        {"a": "How tall is Mount Everest?", "b": "What is the height of Mount Everest in metres?", "duplicate": 1},
        {"a": "Why is the sky blue?", "b": "What makes the sky look blue during the day?", "duplicate": 1},
        {"a": "Is coffee bad for you?", "b": "Is tea good for you?", "duplicate": 0},  # not a duplicate: skipped
    ]
    (tmp_path / "cache").mkdir()
    write_jsonl(tmp_path / "cache" / "qqp_pairs.jsonl", pairs)
    out = tmp_path / "cag.json"
    assert main([
        "bench", "cag-near", "--model", weights("smollm2-135m-instruct"), "--data", str(tmp_path), "--max-new-tokens", "24",
        "--near-in-prompt", "--json", str(out),
    ]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["pairs"] == 4 and result["settings"]["near_in_prompt"] is True
    assert sum(result["outcomes"].values()) == pytest.approx(1.0)
    assert [r["pair"] for r in result["rows"]] == [0, 1, 2, 3]
    written = out.read_text()
    assert not any(p[side] in written for p in pairs for side in "ab")  # the questions stay in the data folder
    near = [r for r in result["rows"] if r["outcome"] == "near"]
    assert result["near_hits"] == len(near) >= 1
    for row in near:
        assert row["first_answer"] and row["references"]  # the cached answers llma was given
        assert row["llma"]["text"] == row["greedy"]["text"]  # lossless
        if row["copy_speedup_bound"] is not None:  # a lookup's copies are a part of any copies
            assert row["copy_speedup_bound"] >= row["lookup_speedup_bound"] >= 1.0
    assert result["methods"]["llma"]["identical_to_greedy"] == 1.0
