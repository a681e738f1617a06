"""FAQ answering and the `cache` / `faq` commands, with the real fallback embedder
(all-minilm-l6-v2) and smollm2-135m-instruct generating when no FAQ entry is safe."""

from __future__ import annotations

import argparse
import json

import pytest

from cache_fixtures import DATA, cache, embedder  # noqa: F401 - fixtures
from ragdec.app.cli_cache import register
from ragdec.cache.faq import FaqService, faq_messages, import_faq, read_faq
from ragdec.files import read_jsonl

SMOLLM = "smollm2-135m-instruct"
FAQ = [
    {
        "id": 1,
        "question": "How do I delete my Facebook account?",
        "answers": ["Go to Settings, then Your Facebook information, then Deactivation and deletion."],
        "paraphrases": ["Removing my FB account.", "I want to get rid of my facebook account, how do I do it?"],
    },
    {
        "id": 2,
        "question": "How do I make strikethrough text in GitHub Markdown?",
        "answers": ["Put ~~two tildes~~ around the words."],
        "paraphrases": ["Crossing out words on github."],
    },
    {
        "id": 3,
        "question": "How can I export my boards from Trello?",
        "answers": ["Open the board menu, then More, then Print and export, and choose JSON."],
        "paraphrases": ["Backing up all my trello data."],
    },
    {
        "id": 4,
        "question": "How do I split a conversation in Gmail?",
        "answers": ["Turn Conversation view off in Settings; messages then stand alone."],
        "paraphrases": ["Gmail merged replies into one thread, can I separate them?"],
    },
]


@pytest.fixture
def faq_file(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FAQ), encoding="utf-8")
    return path


def test_read_faq_accepts_one_answer_and_names_bad_lines(tmp_path, faq_file):
    records = read_faq(faq_file)
    assert [r.id for r in records] == ["1", "2", "3", "4"] and records[0].paraphrases[0] == "Removing my FB account."
    single = tmp_path / "single.jsonl"
    single.write_text('{"question": "Q?", "answer": "A."}\n', encoding="utf-8")
    assert read_faq(single)[0].answers == ("A.",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["A."]}\n{"question": "no answer"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected"):
        read_faq(bad)
    with pytest.raises(FileNotFoundError, match="JSON Lines"):
        read_faq(tmp_path / "absent.jsonl")


def test_faq_served_where_safe_generated_otherwise(cache, faq_file, weights):
    report = import_faq(cache, faq_file, with_paraphrases=False)
    assert (report.records, report.entries) == (4, 4)
    service = FaqService(cache, model=weights(SMOLLM), max_new_tokens=48)

    served = service.ask("How can I delete my facebook account")
    assert not served.generated and served.lookup.outcome == "semantic"
    assert served.text == FAQ[0]["answers"][0]
    assert service._generator is None  # no model loaded for a served answer

    other = service.ask("How do I delete my Instagram account?")  # close to the Facebook entry, another service
    assert other.generated and other.lookup.outcome == "near"
    assert "not in the match: instagram" in other.lookup.reason
    assert FAQ[0]["answers"][0] in other.lookup.references
    assert other.stats["new_tokens"] > 0

    again = service.ask("How do I delete my Instagram account?")
    if other.finish_reason == "stop":  # a complete generated answer is cached for the next asker
        assert (again.generated, again.lookup.outcome, again.text) == (False, "exact", other.text)
    else:  # a cut-off one is not
        assert again.generated


def test_imported_paraphrases_are_exact_hits(cache, faq_file):
    import_faq(cache, faq_file)
    hit = cache.lookup("removing my fb account", model="any", policy="faq")
    assert hit.outcome == "exact" and hit.answer == FAQ[0]["answers"][0]
    import_faq(cache, faq_file)  # importing again replaces, it does not duplicate
    assert len(cache.store) == 9


def test_prompt_carries_the_references():
    messages = faq_messages("How do I delete my Instagram account?", ["Go to Settings ..."])
    assert messages[-1] == {"role": "user", "content": "How do I delete my Instagram account?"}
    assert "[1] Go to Settings ..." in messages[1]["content"]
    assert len(faq_messages("q", [])) == 2


# ---- the commands ------------------------------------------------------------------------


def run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="ragdec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_commands_end_to_end(qa_location, tmp_path, faq_file, capsys, weights):
    db = qa_location
    assert run("faq", "import", faq_file, "--db", db, "--no-paraphrases") == 0
    assert "imported 4 questions as 4 entries" in capsys.readouterr().out

    assert run("faq", "ask", "How can I delete my facebook account", "--db", db, "--model", weights(SMOLLM)) == 0
    out = capsys.readouterr()
    assert out.out.strip() == FAQ[0]["answers"][0] and "semantic hit" in out.err

    answer_json = tmp_path / "answer.json"
    assert run("faq", "ask", "How do I delete my Instagram account?", "--db", db, "--model", SMOLLM,
               "--max-new-tokens", "12", "--json", answer_json) == 0
    answer = json.loads(answer_json.read_text())
    assert answer["generated"] and answer["lookup"]["outcome"] == "near" and answer["stats"]["new_tokens"] <= 12

    # calibration on labelled pairs made from the paraphrase sample (each pair a duplicate,
    # each sentence with the next pair's paraphrase a non-duplicate), with the FAQ file's paraphrases
    paraphrases = read_jsonl(DATA / "cache" / "hf_paraphrases.jsonl")[:41]
    labelled = [{"a": pair["a"], "b": pair["b"], "duplicate": 1} for pair in paraphrases[:40]]
    labelled += [{"a": pair["a"], "b": following["b"], "duplicate": 0} for pair, following in zip(paraphrases, paraphrases[1:])]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(record) + "\n" for record in labelled), encoding="utf-8")
    plot, report = tmp_path / "calibration.png", tmp_path / "calibration.json"
    assert run("cache", "calibrate", "--pairs", pairs, "--faq", faq_file, "--db", db, "--target-false-hit-rate", "0.1",
               "--plot", plot, "--json", report) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    calibrated = json.loads(report.read_text())
    assert calibrated["pairs"]["non_duplicates"] == 40 and calibrated["faq"]["queries"] == 5

    stats_json = tmp_path / "stats.json"
    assert run("cache", "stats", "--db", db, "--json", stats_json) == 0
    out = capsys.readouterr().out
    assert "policy pairs: semantic >=" in out and "policy faq: semantic >=" in out
    stats = json.loads(stats_json.read_text())
    assert stats["entries"] >= 4 and stats["embedder"]["name"] == "all-minilm-l6-v2"

    assert run("cache", "clear", "--db", db, "--model", SMOLLM) == 0
    assert run("cache", "clear", "--db", db, "--max-entries", "2") == 0
    assert "evicted 2" in capsys.readouterr().out
    assert run("cache", "clear", "--db", db) == 0
    assert "deleted 2 entries (all)" in capsys.readouterr().out


def test_command_errors_say_what_to_do(tmp_path, faq_file):
    with pytest.raises(FileNotFoundError, match="ragdec faq import"):
        run("faq", "ask", "anything?", "--db", tmp_path / "absent.sqlite")
    with pytest.raises(FileNotFoundError, match="no QA cache"):
        run("cache", "stats", "--db", tmp_path / "absent.sqlite")
    with pytest.raises(FileNotFoundError, match="--pairs"):
        run("cache", "calibrate", "--pairs", tmp_path / "absent.jsonl", "--db", tmp_path / "c.sqlite")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 300)
    with pytest.raises(ValueError, match="damaged or not a SQLite database"):
        run("cache", "stats", "--db", garbage)
