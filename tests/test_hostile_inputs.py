"""Hostile and broken input (issue 18): work that grows linearly with its input, requests
over the pipeline's limits refused, ingestion that skips a bad file or line and indexes the
rest.

The size guards feed inputs at which the quadratic code they replace took minutes (a
question of 24,000 "?" took 3.8 s; 200,000 would take about four minutes) and assert a
generous bound: they catch a return of the complexity, they are not benchmarks.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import time

import pytest

from ragdec.cache.normalize import normalize_question
from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines import limits
from ragdec.pipelines.prompts import RequestError, build_prompt
from ragdec.pipelines.rag import RagPipeline
from ragdec.pipelines.types import Request, collect
from ragdec.retrieval import readers
from ragdec.retrieval.readers import ReadOptions, SkippedFile, _markdown_title, discover, read_documents, read_jsonl

FAST_S = 2.0  # each hostile input must finish within this (it takes well under 0.1 s)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def timed(call, *args):
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


def varied_strings(seed: int, alphabet: list[str], count: int, longest: int = 14) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) for _ in range(count)]


# ---- the QA cache's question normalizer ------------------------------------------------------

OLD_TRAILING = re.compile(r"[\s?!.\u3002\uff1f\uff01]+$")  # what normalize_question used to strip


def regex_normalize(question: str) -> str:
    """The normalizer as it was, with its backtracking regex: the reference for equality."""
    import unicodedata

    from ragdec.cache.normalize import _QUOTES

    text = " ".join(unicodedata.normalize("NFKC", question).translate(_QUOTES).casefold().split())
    return OLD_TRAILING.sub("", text)


def test_normalizer_is_linear_on_a_long_run_of_question_marks():
    for hostile in ("?" * 200_000 + "a", "? " * 100_000 + "a", "\u3002" * 200_000 + "x", "a" + " ?" * 100_000):
        normalized, seconds = timed(normalize_question, hostile)
        assert seconds < FAST_S, (hostile[:5], seconds)
    assert normalize_question("?" * 200_000 + "a") == "?" * 200_000 + "a"  # inner punctuation stays
    assert normalize_question("a" + " ?" * 100_000) == "a"


def test_normalizer_equals_the_regex_it_replaces():
    ordinary = [
        "  What is  the capital of France?? ", "What is C++?", "Is 3.5 > 35 ?!", "¿Qué es esto？", "東京はどこ。",
        "\u201cquoted\u201d question\u00a0? ", "tabs\tand\nnewlines\r\n?", "", "   ", "?!.", "ﬁne ligatures？",
    ]
    alphabet = ["a", "B", " ", "\t", "\n", "?", "!", ".", "\u3002", "\uff1f", "\uff01", "\u00a0", "\u3000", "+", "é"]
    for question in ordinary + varied_strings(0, alphabet, 20_000):
        assert normalize_question(question) == regex_normalize(question), repr(question)


# ---- markdown titles -------------------------------------------------------------------------

HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")  # the old pattern, applied here to one line at a time


def regex_title(text: str) -> str | None:
    """The old title regex run line by line, skipping headings with no text: what it returned
    on every markdown file except those (where ``\\s+`` let it borrow the next line's text)."""
    for line in text.split("\n"):
        match = HEADING.match(line)
        if match and match.group(1).strip():
            return match.group(1)
    return None


def test_markdown_title_is_linear_on_long_runs_of_spaces():
    spaces = " " * 100_000
    for hostile in ("# a" + spaces + "b", "#" + spaces + "\n", "#" + spaces, "# t" + spaces + "#" * 50_000 + spaces,
                    ("#" + spaces + "\n") * 10, "#" * 100_000 + " x"):
        _, seconds = timed(_markdown_title, hostile)
        assert seconds < FAST_S, (hostile[:5], seconds)
    assert _markdown_title("# a" + spaces + "b") == "a" + spaces + "b"
    assert _markdown_title("# t" + spaces + "#" * 50_000 + spaces) == "t"


def test_markdown_title_equals_the_regex_it_replaces():
    ordinary = [
        "# Title", "## Kitchen garden ##\n", "intro\n####### no\n## Kitchen garden ##\n", "# C# ##", "#\tTab\r\n",
        "no heading", "#NoSpace\n# Real", "  # indented\n# Real", "text\n### Deep # inner # ##  \nmore", "###### six",
    ]
    alphabet = ["#", " ", "\t", "\n", "a", "b", "\r", "\u00a0", "\u3000", "x#"]
    for text in ordinary + varied_strings(1, alphabet, 50_000):
        assert _markdown_title(text) == regex_title(text), repr(text)
    assert _markdown_title("#  \nBody text") is None  # an empty heading does not borrow the next line


# ---- history fitting -------------------------------------------------------------------------


def quadratic_build_prompt(template, system, history, user_text, max_prompt_tokens):
    """``build_prompt`` as it was: template everything, drop the oldest turn, again."""
    history = list(history)
    dropped = 0
    while True:
        head = [{"role": "system", "content": system}, *history]
        ids = template([*head, {"role": "user", "content": user_text}])
        if len(ids) <= max_prompt_tokens:
            break
        if not history:
            raise RequestError("shorten the question")
        cut = 2 if len(history) > 1 and history[1]["role"] == "assistant" else 1
        del history[:cut]
        dropped += cut
    marker = template([*head, {"role": "user", "content": ""}])
    prefix_len = 0
    while prefix_len < min(len(ids), len(marker)) and ids[prefix_len] == marker[prefix_len]:
        prefix_len += 1
    return ids, prefix_len, dropped


@pytest.fixture(scope="module")
def templates(tiny_tokenizer):
    """Two real templates over the tiny tokenizer: messages joined by newlines (what
    ``Generator.prompt_ids`` does without a chat template) and ChatML."""
    chatml = copy.copy(tiny_tokenizer)
    chatml.chat_template = CHATML

    def plain(messages):
        return tiny_tokenizer("\n".join(m["content"] for m in messages))["input_ids"]

    def chat(messages):
        ids = chatml.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return {"plain": plain, "chatml": chat}


def history_of(turns: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the tower was built in 1889 paris capital france quick brown fox answer question".split()
    history = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"question {turn}: " + " ".join(rng.choices(words, k=rng.randint(1, 30)))})
        if rng.random() < 0.9:  # now and then a user message without its answer
            history.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(0, 60)))})
    return history


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_history_fitting_equals_the_quadratic_algorithm(templates, kind):
    template = templates[kind]
    for seed, turns, limit in [(0, 0, 100), (1, 3, 400), (2, 12, 150), (3, 40, 300), (4, 40, 5000), (5, 90, 700),
                               (6, 1, 60), (7, 25, 1000)]:
        history = history_of(turns, seed)
        if seed == 6:
            history = [{"role": "assistant", "content": "an answer first"}, *history]
        question = "what was built in 1889?"
        try:
            expected = quadratic_build_prompt(template, "sys prompt", history, question, limit)
        except RequestError:
            with pytest.raises(RequestError, match="shorten the question"):
                build_prompt(template, "sys prompt", history, question, limit)
            continue
        prompt = build_prompt(template, "sys prompt", history, question, limit)
        assert (prompt.token_ids, prompt.prefix_len, prompt.dropped_turns) == expected, (seed, turns, limit)


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_history_fitting_is_linear_in_the_history(templates, kind):
    history = history_of(5_000, seed=8)
    prompt, seconds = timed(build_prompt, templates[kind], "sys prompt", history, "what was built in 1889?", 3072)
    assert seconds < FAST_S
    assert len(prompt.token_ids) <= 3072 and 0 < prompt.dropped_turns < len(history)
    kept = history[prompt.dropped_turns :]
    assert kept[-1] == history[-1]  # the newest turns stay


# ---- request limits --------------------------------------------------------------------------


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_requests_over_a_limit_end_in_an_error_chunk(tiny_generator):
    long_chat = [user("q"), {"role": "assistant", "content": "a"}] * (limits.MAX_MESSAGES // 2) + [user("last?")]
    params = GenerationParams(max_new_tokens=4, method="greedy")
    requests = {
        "messages": Request(long_chat, params=params),
        "references": Request([user("q?")], references=["r"] * (limits.MAX_REFERENCES + 1), params=params),
        "characters": Request([user("q?")], references=["x" * (limits.MAX_REQUEST_CHARS + 1)], params=params),
        "stop strings": Request([user("q?")], params=GenerationParams(4, stop=tuple("abcdefghijklmnopq"), method="greedy")),
        "characters, over the limit of 100": Request([user("q?")], params=GenerationParams(4, stop=("x" * 101,), method="greedy")),
        "fine": Request([user("q?")], params=params),
    }
    answers = dict(zip(requests, collect(RagPipeline(tiny_generator), list(requests.values()))))
    for says, answer in answers.items():
        if says == "fine":
            assert answer.finish_reason in ("stop", "length")
            continue
        assert answer.finish_reason == "error", says
        assert says in answer.info.error and "limit" in answer.info.error, answer.info.error


# ---- reading files ---------------------------------------------------------------------------


def test_a_bad_jsonl_line_is_skipped_with_its_number(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "A fine record about lighthouses."}),
        '{"id": "b", "text": "a lone surrogate \\ud800 here"}',  # valid JSON, not valid Unicode
        '{"id": "c", "text": "huge", "n": ' + "9" * 5_000 + "}",  # over Python's int digits limit
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than the parser's recursion
        '{"id": "d", "title": "\\udfff", "text": "a surrogate in the title"}',
        json.dumps({"id": "e", "text": "Another fine record."}),
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    documents, notes = read_jsonl(path, path.read_bytes(), ReadOptions(max_line_chars=1_000_000))
    assert [d.record for d in documents] == ["a", "e"]
    assert any("not valid Unicode" in note and "line 2, 5" in note for note in notes), notes
    assert any("not JSON" in note and "line 3, 4" in note for note in notes), notes


def test_files_over_the_size_cap_are_skipped_with_the_flag_that_raises_it(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word word word word\n" * 12_500, encoding="utf-8")  # 250,000 bytes
    with pytest.raises(SkippedFile, match="--max-file-mb"):
        read_documents(path, ReadOptions(max_file_bytes=100_000))
    assert read_documents(path, ReadOptions(max_file_bytes=1_000_000))[0]
    assert readers.MAX_FILE_MB * 1024 * 1024 == ReadOptions().max_file_bytes


def test_a_directory_or_a_vanished_file_is_skipped_not_raised(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    for path in (tmp_path / "folder.txt", tmp_path / "gone.md", tmp_path / "gone.pdf"):
        with pytest.raises(SkippedFile, match="cannot read|no longer exists|not a file"):
            read_documents(path)


def test_symlinks_leaving_the_folder_are_skipped_with_a_message(tmp_path):
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2", encoding="utf-8")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "real.txt").write_text("Kept.", encoding="utf-8")
    (docs / "inside.txt").symlink_to(docs / "real.txt")  # stays in the folder: the same file, once
    (docs / "leak.txt").symlink_to(outside / "passwords.txt")
    (docs / "sub" / "leak_dir").symlink_to(outside, target_is_directory=True)
    (docs / "loop").symlink_to(docs / "loop")  # a link to itself
    files, skipped = discover([docs])
    assert files == [(docs / "real.txt").resolve()]
    reasons = dict(skipped)
    assert "outside" in reasons[str(docs / "leak.txt")] and "outside" in reasons[str(docs / "sub" / "leak_dir")]
    assert not any("passwords" in str(f) for f in files)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_skipped(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(SkippedFile, match="cannot read"):
            read_documents(path)
    finally:
        path.chmod(0o644)


# ---- a whole build over a hostile folder ---------------------------------------------------


def test_a_build_skips_each_bad_file_with_its_reason_and_indexes_the_rest(tmp_path, minilm, monkeypatch):
    from ragdec.retrieval import ingest as ingest_module
    from ragdec.retrieval.ingest import ingest
    from ragdec.retrieval.retriever import Retriever

    docs, outside = tmp_path / "docs", tmp_path / "outside"
    docs.mkdir()
    outside.mkdir()
    (docs / "lighthouse.txt").write_text("The lighthouse on Skerry Point was built in 1871 from granite.", encoding="utf-8")
    (docs / "garden.md").write_text("#" + " " * 100_000 + "a\n\nBasil is planted between the tomatoes.\n", encoding="utf-8")
    (docs / "records.jsonl").write_text("\n".join([
        json.dumps({"id": "tide", "text": "The tidal observatory recorded a surge of 3.2 metres in 1953."}),
        '{"id": "bad", "text": "lone \\ud800 surrogate"}',
        '{"id": "big", "text": "x", "n": ' + "7" * 5_000 + "}",
    ]) + "\n", encoding="utf-8")
    (docs / "dump.txt").write_text("a line of a dump\n" * 10_000, encoding="utf-8")  # 170,000 bytes
    (docs / "folder.txt").mkdir()  # discovered only through the patched listing below
    (docs / "vanishing.txt").write_text("Here when listed, gone when read.", encoding="utf-8")
    (outside / "secret.txt").write_text("The vault code is 4711.", encoding="utf-8")
    (docs / "leak.txt").symlink_to(outside / "secret.txt")

    def listing_then_removal(paths):
        files, skipped = discover(paths)
        (docs / "vanishing.txt").unlink()
        return sorted([*files, (docs / "folder.txt").resolve()]), skipped

    monkeypatch.setattr(ingest_module, "discover", listing_then_removal)
    warnings: list[str] = []
    with Retriever.open_for_writing(tmp_path / "store", minilm) as retriever:
        report = ingest(retriever, [docs], ReadOptions(max_file_bytes=150_000), progress=False, warn=warnings.append)
        retriever.save()

    skipped = {os.path.basename(path): reason for path, reason in report.files_skipped}
    assert "--max-file-mb" in skipped["dump.txt"]
    assert "no longer exists" in skipped["vanishing.txt"]
    assert "not a file" in skipped["folder.txt"]
    assert "outside" in skipped["leak.txt"]
    assert all(any(name in w for w in warnings) for name in skipped)
    assert any("records.jsonl" in w and "not valid Unicode" in w and "line 2" in w for w in warnings)
    assert any("records.jsonl" in w and "not JSON" in w and "line 3" in w for w in warnings)
    assert report.files_indexed == 3 and report.passages_added == 3

    with Retriever.open(tmp_path / "store", minilm) as retriever:
        sources = {os.path.basename(s.path) for s in retriever.documents.sources()}
        assert sources == {"lighthouse.txt", "garden.md", "records.jsonl"}
        assert retriever.search("when was the surge measured at the observatory?", k=1)[0].passage.record == "tide"
        assert all("4711" not in hit.text for hit in retriever.search("vault code", k=5, mode="hybrid"))


def test_max_file_mb_reaches_the_reader(tmp_path, monkeypatch):
    from ragdec.app.cli import main
    from ragdec.retrieval import ingest as ingest_module
    from ragdec.retrieval.ingest import IngestReport

    given = {}

    def fake_build(paths, store, read_options, **_):
        given["read_options"] = read_options
        return IngestReport(0, 0, (), 0, 0, 0, 0, 0.0, 0.0)

    monkeypatch.setattr(ingest_module, "build", fake_build)
    assert main(["index", "build", str(tmp_path), "--store", str(tmp_path / "store"), "--max-file-mb", "0.5"]) == 0
    assert given["read_options"].max_file_bytes == 512 * 1024
    main(["index", "build", str(tmp_path), "--store", str(tmp_path / "store")])
    assert given["read_options"].max_file_bytes == readers.MAX_FILE_MB * 1024 * 1024


def test_a_long_chat_session_sends_its_newest_turns_within_the_limits():
    from ragdec.pipelines.chat import ChatSession
    from ragdec.pipelines.types import Chunk

    class Recorder:
        def __init__(self):
            self.requests = []

        def stream(self, requests):
            self.requests += requests
            yield Chunk(0, "fine", "stop")

    recorder = Recorder()
    chat = ChatSession(recorder, system="be brief")
    chat.messages = [{"role": r, "content": f"{r} {i} " + "w" * 50} for i in range(3_000) for r in ("user", "assistant")]
    assert "".join(c.text for c in chat.ask("and now?")) == "fine"
    sent = recorder.requests[0].messages
    limits.check_limits(recorder.requests[0])  # within every limit
    assert sent[0]["role"] == "system" and sent[1]["role"] == "user" and sent[-1]["content"] == "and now?"
    assert sent[-2] == chat.messages[-3]  # the newest turn before the question (now followed by its answer)
    assert len(chat.messages) == 6_002  # the session itself keeps everything
