"""ROUGE-L in the decoding benchmark, the BiLD/FREE workloads, and the sweep plot: a real
`ragdec bench` run on smollm2 over a few XSum, SQuAD and Spec-Bench records."""

from __future__ import annotations

import json

import pytest
from retrieval_fixtures import write_jsonl

from ragdec.bench.quality import quality, rouge_l
from ragdec.bench.sweep_plot import plot_sweep, settings_label
from ragdec.bench.workloads import load_workload


def test_rouge_l_docstring_example_and_best_target():
    assert rouge_l("the cat sat on the mat", ["a cat was sitting on the mat"]) == pytest.approx(0.6154, abs=1e-4)
    assert rouge_l("the cat sat on the mat", ["dogs bark", "the cat sat on the mat"]) == 1.0
    with pytest.raises(ValueError, match="at least one target"):
        rouge_l("text", [])


def test_quality_skips_prompts_without_targets():
    q = quality(["paris is the capital", "blue"], [("Paris is the capital",), ()], ["paris is the capital", "red"])
    assert q["rougeL"] == 1.0 and q["rougeL_prompts"] == 1
    assert q["rougeL_vs_reference_method"] == 0.5  # 1.0 on the first prompt, 0 on the second
    assert quality(["x"], [()], ["x"])["rougeL"] is None


@pytest.fixture
def data(tmp_path):
    (tmp_path / "summarize").mkdir()
    write_jsonl(tmp_path / "summarize" / "xsum.jsonl", [
        {"id": "x1", "document": "The city council approved a new park on Monday. It will open next spring.", "summary": "A new park will open next spring."},
        {"id": "x2", "document": "Heavy rain flooded roads across the region overnight.", "summary": "Rain flooded roads overnight."},
    ])
    (tmp_path / "qa").mkdir()
    write_jsonl(tmp_path / "qa" / "squad_passages.jsonl", [{"id": "p#0", "title": "Tesla", "text": "Nikola Tesla was born in 1856."}])
    write_jsonl(tmp_path / "qa" / "squad_questions.jsonl", [
        {"id": "1", "question": "When was Tesla born?", "answers": "['1856', 'in 1856']", "passage_id": "p#0"},
        {"id": "2", "question": "Unknown passage?", "answers": ["x"], "passage_id": "missing#0"},
    ])
    (tmp_path / "specbench").mkdir()
    write_jsonl(tmp_path / "specbench" / "question.jsonl", [
        {"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]},
        {"question_id": 2, "category": "translation", "turns": ["Translate German to English: Guten Morgen"], "reference": ["Good morning"]},
        {"question_id": 3, "category": "rag", "turns": ["not this category"]},
    ])
    return tmp_path


def test_workloads_carry_their_targets(data):
    xsum = load_workload("xsum", str(data))
    assert [p.targets for p in xsum] == [("A new park will open next spring.",), ("Rain flooded roads overnight.",)]
    assert "one sentence" in xsum[0].messages[0]["content"] and not xsum[0].references
    squad = load_workload("squad", str(data))
    assert len(squad) == 1 and squad[0].targets == ("1856", "in 1856")  # answers stored as a list's text
    assert "Nikola Tesla was born in 1856." in squad[0].messages[0]["content"]
    spec = load_workload("specbench-qa-translation", str(data))
    assert [p.targets for p in spec] == [(), ("Good morning",)]


def test_bench_reports_rouge_and_the_sweep_plots(data, tmp_path, weights):
    from ragdec.app.cli import main

    out = tmp_path / "xsum.json"
    code = main([
        "bench", "xsum", "--model", weights("smollm2-135m-instruct"), "--data", str(data), "--max-new-tokens", "12",
        "--methods", "hf-greedy,bild-lossless,bild:rollback_threshold=0", "--draft-model", "smollm2-135m-instruct",
        "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    for method, entry in result["methods"].items():
        assert 0.0 <= entry["rougeL"] <= 1.0 and entry["rougeL_prompts"] == 2
        if method != "hf-greedy":  # lossless, and rollback at every doubt: both equal greedy
            assert entry["identical_to_hf_greedy"] == 1.0 and entry["rougeL"] == result["methods"]["hf-greedy"]["rougeL"]
            assert entry["rougeL_vs_reference_method"] == 1.0
            assert 0.0 <= entry["accepted_draft_share"] <= entry["drafted_share"]
            if method == "bild-lossless":  # smollm2 drafting for itself: its drafts stand
                assert entry["accepted_draft_share"] > 0.0
        else:
            assert "drafted_share" not in entry
    assert result["settings"]["dtype"] == "float32"
    png = tmp_path / "sweep.png"
    plot_sweep(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert settings_label("bild:fallback_threshold=0.6:rollback_threshold=2") == "bild f0.6 r2"
