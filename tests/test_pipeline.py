"""The answer pipeline: prompts and budgets, the router, kept prefixes, and RAG and chat
end to end on real parts (a SQLite + FAISS store of SQuAD paragraphs, the QA cache,
smollm2-135m-instruct)."""

from __future__ import annotations

import pytest
from retrieval_fixtures import sample_records, write_jsonl

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.chat import ChatSession
from ragdec.pipelines.prompts import RequestError, build_prompt, fit_sources, retrieval_query, split_messages
from ragdec.pipelines.rag import RagPipeline, RagSettings, question_request
from ragdec.pipelines.router import Router
from ragdec.pipelines.types import Request, Source, collect

# ---- prompts ---------------------------------------------------------------------------


def test_split_messages_takes_system_history_and_question():
    system, history, question = split_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare."},
        {"role": "user", "content": "  When was he born? "},
    ])
    assert system == "Be brief."
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert question == "When was he born?"


@pytest.mark.parametrize("messages, says", [
    ([], "no messages"),
    ([{"role": "user", "content": "   "}], "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
])
def test_bad_messages_say_what_to_change(messages, says):
    with pytest.raises(RequestError, match=says):
        split_messages(messages)


def test_retrieval_query_carries_the_last_turns():
    history = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "William Shakespeare wrote it."}]
    query = retrieval_query("When was he born?", history)
    assert query.startswith("Who wrote Hamlet?") and "Shakespeare" in query and query.endswith("When was he born?")
    assert retrieval_query("When?", []) == "When?"


def words(text: str) -> int:
    return len(text.split())


def test_fit_sources_keeps_the_best_that_fit_and_renumbers():
    sources = [Source(i, i, "", " ".join(["w"] * n), 1.0 - i / 10) for i, n in enumerate([50, 200, 30], 1)]
    kept = fit_sources(sources, budget=100, count_tokens=words)
    assert [s.id for s in kept] == [1, 3]  # the 200-word passage does not fit; a later short one does
    assert [s.number for s in kept] == [1, 2]
    cut = fit_sources(sources[1:2], budget=100, count_tokens=words)
    assert len(cut) == 1 and words(cut[0].text) < 100  # a first passage is cut, not dropped


def test_build_prompt_drops_oldest_turns_and_marks_the_kept_prefix():
    def template(messages):  # one token per word, a marker per message
        return [t for m in messages for t in ["<" + m["role"] + ">", *m["content"].split()]]

    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"question {turn} " + "x " * 10}, {"role": "assistant", "content": "answer " * 10}]
    prompt = build_prompt(template, "sys", history, "the last question", max_prompt_tokens=60)
    assert len(prompt.token_ids) <= 60 and prompt.dropped_turns > 0 and prompt.dropped_turns % 2 == 0
    assert prompt.token_ids[prompt.prefix_len] == "the"  # the last user message's text starts after the prefix
    assert prompt.token_ids[prompt.prefix_len - 1] == "<user>"
    with pytest.raises(RequestError, match="shorten the question"):
        build_prompt(template, "sys", [], "word " * 100, max_prompt_tokens=60)


def test_default_method_is_bild_only_for_a_prepared_pair(tmp_path, monkeypatch):
    from ragdec.models import zoo
    from ragdec.pipelines.router import default_method

    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path))  # nothing prepared here
    assert default_method("qwen2.5-coder-1.5b-instruct") == "greedy"
    prepared = set()
    monkeypatch.setattr(zoo, "model_status", lambda name: "prepared" if name in prepared else "missing")
    prepared.add("qwen2.5-coder-1.5b-instruct")
    assert default_method("qwen2.5-coder-1.5b-instruct") == "greedy"  # its little model is missing
    prepared.add("qwen2.5-coder-0.5b-instruct")
    assert default_method("qwen2.5-coder-1.5b-instruct") == "bild-lossless"
    assert default_method("qwen2.5-coder-0.5b-instruct") == "greedy"  # no little model for it
    assert default_method("tiny-llama") == "greedy"


def test_router_keeps_a_forced_method_and_routes_auto():
    router = Router(default="greedy")
    assert router.choose("greedy", has_references=True) == "greedy"
    assert router.choose("auto", has_references=True) == "llma"
    assert router.choose("auto", has_references=False) == "greedy"
    assert router.choose("auto", True, group_size=3) == "llma"  # no batch method offered
    both = frozenset({"pid", "pid-llma"})
    assert router.choose("auto", True, group_size=3, batch_methods=both) == "pid-llma"
    assert router.choose("auto", False, group_size=3, batch_methods=both) == "pid"
    assert router.choose("auto", True, group_size=1, batch_methods=both) == "llma"


# ---- kept prefixes in the decoder ---------------------------------------------------------


def test_kept_prefix_is_reused_and_changes_no_token(tiny_generator):
    generator = tiny_generator
    generator.prefixes.clear()
    params = GenerationParams(max_new_tokens=12)
    head = [5, 6, 7, 8, 9, 10, 11, 12]
    for tail in ([20, 21, 22], [30, 31], [40]):
        plain = generator.generate(head + tail, params)
        first = generator.generate(head + tail, params, prefix_len=len(head))
        again = generator.generate(head + tail, params, prefix_len=len(head))
        assert plain.token_ids == first.token_ids == again.token_ids
        assert again.stats.reused_prompt_tokens == len(head)
    assert len(generator.prefixes) == 1
    # a prefix as long as the prompt still leaves a token to prefill
    whole = generator.generate(head, params, prefix_len=len(head))
    assert whole.token_ids == generator.generate(head, params).token_ids
    generator.prefixes.clear()


def test_prefix_store_drops_the_least_recently_used(tiny_generator):
    from ragdec.decoding.kv import PrefixStore

    store = PrefixStore(capacity=2)
    generator = tiny_generator
    generator.prefixes = store
    try:
        for head in ([5, 6, 7], [8, 9, 10], [11, 12, 13]):
            generator.generate(head + [20], GenerationParams(max_new_tokens=2), prefix_len=3)
        assert len(store) == 2
        assert store.longest([5, 6, 7, 20])[1] == 0  # the oldest was dropped
        assert store.longest([11, 12, 13, 20])[1] == 3
    finally:
        generator.prefixes = type(store)()


# ---- end to end on real parts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, minilm):
    from ragdec.retrieval.ingest import build
    from ragdec.retrieval.retriever import Retriever

    folder = tmp_path_factory.mktemp("store")
    source = write_jsonl(folder.parent / "sample.jsonl", sample_records(per_article=2))
    build([source], folder / "docs.store", embedder=minilm, progress=False)
    with Retriever.open(folder / "docs.store", minilm) as retriever:
        yield retriever


@pytest.fixture
def qa_cache(tmp_path, minilm):
    from ragdec.cache.lookup import QACache

    cache = QACache.open(tmp_path / "qa.sqlite", minilm)
    yield cache
    cache.close()


def test_rag_answers_with_sources_stats_and_llma_equal_to_greedy(store, smollm2):
    pipeline = RagPipeline(smollm2, store, settings=RagSettings(k=3))
    question = "In what year was Nikola Tesla born?"
    greedy, llma, auto = collect(pipeline, [
        question_request(question, method="greedy", max_new_tokens=40),
        question_request(question, method="llma", max_new_tokens=40),
        question_request(question, max_new_tokens=40),
    ])
    assert greedy.text and greedy.text == llma.text == auto.text
    assert greedy.info.method == "greedy" and llma.info.method == "llma" and auto.info.method == "llma"
    assert any(s.title == "Nikola Tesla" for s in llma.info.sources)
    assert [s.number for s in llma.info.sources] == list(range(1, len(llma.info.sources) + 1))
    assert llma.info.cache == "off" and llma.info.ttft_s > 0 and llma.info.tokens_per_s > 0
    assert llma.stats.reused_prompt_tokens > 0  # the system prompt was kept from the first request


def test_cache_answers_a_repeated_question_and_near_hits_become_references(store, smollm2, qa_cache):
    pipeline = RagPipeline(smollm2, store, qa_cache, RagSettings(k=2))
    question = "Where did the black death originate?"
    first, = collect(pipeline, [question_request(question, max_new_tokens=100)])
    assert first.info.cache == "miss" and first.finish_reason in ("stop", "length")
    if first.finish_reason != "stop":
        pytest.skip("the answer ran out of tokens, so it was not cached")
    again, = collect(pipeline, [question_request("where did the Black Death originate", max_new_tokens=100)])
    assert again.info.cache == "exact" and again.info.method == "cache" and again.text == first.text.strip()
    # a follow-up in a conversation depends on its history: never served from the cache
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    follow, = collect(pipeline, [Request([*history, {"role": "user", "content": question}],
                                         params=GenerationParams(max_new_tokens=4))])
    assert follow.info.cache == "off"


def test_near_hit_answers_can_go_into_the_prompt_as_passages(smollm2, qa_cache):
    """``near_in_prompt``: a near hit's stored answer is a numbered passage the model reads
    (and a source the caller sees), for greedy and llma alike; off, it is a reference only."""
    from ragdec.pipelines.rag import NEAR_ANSWER_TITLE

    stored = "You cannot safely lose 5 kg in a week; aim for 0.5 to 1 kg."
    question = "How do I lose 10 kg in a week?"  # the numbers differ: near, never served
    answers = {}
    for near_in_prompt in (False, True):
        pipeline = RagPipeline(smollm2, None, qa_cache, RagSettings(cache_answers=False, near_in_prompt=near_in_prompt))
        qa_cache.put("How do I lose 5 kg in a week?", stored, model=pipeline.engine.name, store_version=pipeline.store_version)
        greedy, llma = collect(pipeline, [question_request(question, method=m, max_new_tokens=24) for m in ("greedy", "llma")])
        assert greedy.info.cache == llma.info.cache == "near"
        assert greedy.text == llma.text
        answers[near_in_prompt] = greedy
    assert answers[False].info.sources == ()
    source, = answers[True].info.sources
    assert (source.number, source.title, source.text) == (1, NEAR_ANSWER_TITLE, stored)
    assert answers[True].stats.prompt_tokens > answers[False].stats.prompt_tokens + 10


def test_chat_keeps_history_reuses_its_kv_and_copies_from_it(store, smollm2):
    pipeline = RagPipeline(smollm2, store, settings=RagSettings(k=2))
    greedy = ChatSession(pipeline, GenerationParams(max_new_tokens=24, method="greedy"))
    llma = ChatSession(pipeline, GenerationParams(max_new_tokens=24, method="llma"))
    for question in ("Who was Nikola Tesla?", "Repeat your last answer word for word."):
        texts = {}
        for name, session in (("greedy", greedy), ("llma", llma)):
            chunks = list(session.ask(question))
            texts[name] = "".join(c.text for c in chunks)
            last = chunks[-1]
            assert last.finish_reason in ("stop", "length"), last.info.error
        assert texts["greedy"] == texts["llma"]
    assert len(llma.messages) == 4
    assert last.stats.reused_prompt_tokens > 0
    llma.reset()
    assert llma.messages == [] and llma.last_info is None


def test_chat_overflow_drops_old_turns_instead_of_failing(smollm2):
    pipeline = RagPipeline(smollm2, settings=RagSettings(max_prompt_tokens=200))
    history = []
    for turn in range(8):
        history += [{"role": "user", "content": f"Tell me fact number {turn} about the sea."},
                    {"role": "assistant", "content": "The sea is large and deep and full of salt water. " * 2}]
    answer, = collect(pipeline, [Request([*history, {"role": "user", "content": "And the sky?"}],
                                         params=GenerationParams(max_new_tokens=8, method="greedy"))])
    assert answer.finish_reason in ("stop", "length")
    assert answer.info.dropped_turns >= 2 and answer.stats.prompt_tokens <= 200


def test_bad_requests_become_error_chunks(smollm2):
    pipeline = RagPipeline(smollm2)
    empty, huge, unknown = collect(pipeline, [
        question_request("   "),
        question_request("why " * 25_000),
        question_request("Hello?", method="no-such-method"),
    ])
    assert empty.finish_reason == "error" and "empty" in empty.info.error
    assert huge.finish_reason == "error" and "shorten the question" in huge.info.error
    assert unknown.finish_reason == "error" and "unknown decoding method" in unknown.info.error


def test_a_system_message_and_references_are_copyable(smollm2):
    story = "The lighthouse keeper, Ada Brook, lit the lamp every evening at seven for forty years."
    pipeline = RagPipeline(smollm2)
    messages = [{"role": "system", "content": f"Answer questions about this story.\n\n{story}"},
                {"role": "user", "content": "Repeat the story word for word."}]
    greedy, llma = collect(pipeline, [Request(messages, params=GenerationParams(max_new_tokens=30, method=m)) for m in ("greedy", "llma")])
    assert greedy.text == llma.text
    assert llma.stats.accepted_tokens > 0  # copied from the system message's story
    auto, = collect(pipeline, [Request(messages, params=GenerationParams(max_new_tokens=4, method="auto"))])
    assert auto.info.method == "llma"  # the system message is text to copy from (where chains put context)


# ---- commands ------------------------------------------------------------------------------


def test_ask_command_streams_sources_and_stats(store, capsys, tmp_path, monkeypatch):
    from ragdec.app.cli import main
    from ragdec.decoding import int4

    monkeypatch.delenv(int4.COMPILE_ENV, raising=False)
    monkeypatch.setattr(int4, "_compile_prompts", True)
    code = main(["ask", "In what year was Nikola Tesla born?", "--store", str(store.folder), "--model", "smollm2-135m-instruct",
                 "--max-new-tokens", "24", "-k", "2", "--db", str(tmp_path / "qa.sqlite"), "--json", str(tmp_path / "a.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Sources:" in out and "[1]" in out
    assert "tokens/forward" in err and "cache miss" in err
    import json

    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["answers"][0]["info"]["sources"]
    assert not int4.compiling_prompts()  # one question does not repay compiling the int4 prompt path


@pytest.mark.parametrize("argv, says", [
    (["ask", "Hello?", "--store", "/nonexistent/store"], "ragdec index build"),
    (["ask", "  ", "--no-cache", "--model", "smollm2-135m-instruct"], "empty"),
])
def test_ask_command_errors_say_what_to_do(argv, says, capsys):
    from ragdec.app.cli import main

    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_chat_command_keeps_turns_and_knows_its_commands(store, capsys, monkeypatch):
    import io

    from ragdec.app.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Who was Nikola Tesla?\n/sources\n/nope\n/reset\n/quit\n"))
    code = main(["chat", "--store", str(store.folder), "--model", "smollm2-135m-instruct", "--no-cache", "--max-new-tokens", "12", "-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[1]" in out  # /sources listed the passage
    assert "unknown command /nope" in err and "conversation forgotten" in err


def test_questions_about_one_document_are_answered_together_by_pid(smollm2):
    story = ("The lighthouse keeper, Ada Brook, lit the lamp every evening at seven. She lived on Gull Island "
             "with a grey cat called Pepper and kept a logbook of every ship that passed.")
    head = [{"role": "system", "content": f"Answer the question from this document.\n\n{story}"}]
    questions = ["Who lit the lamp?", "What was the cat called?", "Where did she live?"]
    pipeline = RagPipeline(smollm2)
    params = GenerationParams(max_new_tokens=24, method="auto")
    requests = [Request([*head, {"role": "user", "content": q}], (story,), params) for q in questions]
    other = Request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], (), params)
    assert pipeline._groups([requests[0], requests[1], other, requests[2]]) == [[0, 1, 3], [2]]
    together = collect(pipeline, requests)
    alone = [collect(pipeline, [r])[0] for r in requests]
    assert [a.info.method for a in together] == ["pid-llma"] * 3
    assert [a.info.method for a in alone] == ["llma"] * 3
    assert [a.text for a in together] == [a.text for a in alone]
    # with a store, each question gets passages of its own: no grouping
    assert RagPipeline(smollm2, retriever=object())._groups(requests) == [[0], [1], [2]]


def test_ask_several_questions_about_a_document(tmp_path, capsys, weights):
    from ragdec.app.cli import main

    document = tmp_path / "story.txt"
    document.write_text("Ada Brook kept the lighthouse on Gull Island. Her grey cat was called Pepper.", encoding="utf-8")
    questions = tmp_path / "questions.txt"
    questions.write_text("What was the cat called?\n\nWhere was the lighthouse?\n", encoding="utf-8")
    code = main(["ask", "Who kept the lighthouse?", "--questions-file", str(questions), "--document", str(document),
                 "--model", weights("smollm2-135m-instruct"), "--no-cache", "--max-new-tokens", "16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("Q: ") == 3 and "Q: Where was the lighthouse?" in out
    assert err.count("[pid-llma") == 3
    assert main(["ask", "--no-cache", "--document", str(tmp_path / "missing.txt"), "Why?"]) == 2
    assert "not found" in capsys.readouterr().err
