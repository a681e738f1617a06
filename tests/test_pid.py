"""PiD: every row of a batch equals answering that question alone with greedy, token for token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ragdec.decoding.generator import Generator
from ragdec.decoding.methods import GenerationParams
from ragdec.decoding.pid import pid_generate, pid_stream, shared_prefix_len

DATA = Path(__file__).parent / "data"  # small samples of the benchmark data


def greedy(generator: Generator, prompt, max_new_tokens=30, stop=()):
    return generator.generate(prompt, GenerationParams(max_new_tokens=max_new_tokens, stop=stop))


def document_prompts(vocab_size: int, count: int, seed: int = 0, doc_len: int = 60) -> list[list[int]]:
    """One random document, then questions of 1 to 40 tokens: prompts sharing a long prefix."""
    rng = random.Random(seed)
    document = [rng.randrange(2, vocab_size) for _ in range(doc_len)]
    lengths = [1, 40, *(rng.randrange(1, 41) for _ in range(count - 2))][:count]
    return [document + [rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def assert_rows_equal_greedy(generator, prompts, params, references=(), share="view"):
    ours = pid_generate(generator, prompts, params, references, share=share)
    for i, prompt in enumerate(prompts):
        expected = greedy(generator, prompt, params.max_new_tokens, params.stop)
        assert ours[i].token_ids == expected.token_ids, f"row {i}"
        assert (ours[i].text, ours[i].finish_reason) == (expected.text, expected.finish_reason), f"row {i}"
    return ours


def test_shared_prefix_len_docstring_example():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7]]) == 2
    assert shared_prefix_len([[1, 2, 3]]) == 2
    assert shared_prefix_len([[5, 1], [6, 1]]) == 0


@pytest.mark.parametrize("share", ["view", "copy"])
def test_pid_rows_equal_greedy_on_tiny_models(tiny_generator, share):
    prompts = document_prompts(len(tiny_generator.tokenizer), 7, seed=1)
    assert_rows_equal_greedy(tiny_generator, prompts, GenerationParams(max_new_tokens=30, method="pid"), share=share)


def test_pid_without_a_shared_prefix_and_with_one_row(tiny_generator):
    rng = random.Random(5)
    vocab = len(tiny_generator.tokenizer)
    unrelated = [[rng.randrange(2, vocab) for _ in range(n)] for n in (3, 17, 1, 29)]
    params = GenerationParams(max_new_tokens=20, method="pid")
    assert_rows_equal_greedy(tiny_generator, unrelated, params)
    assert_rows_equal_greedy(tiny_generator, unrelated[1:2], params)
    assert_rows_equal_greedy(tiny_generator, [[7]], params)


def test_rows_that_end_at_once(tiny_generator):
    prompts = document_prompts(len(tiny_generator.tokenizer), 5, seed=2)
    assert_rows_equal_greedy(tiny_generator, prompts, GenerationParams(max_new_tokens=1, method="pid"))
    # EOS as the first token of some rows: make row 0's first greedy token the EOS
    model = tiny_generator.model
    first = greedy(tiny_generator, prompts[0], 1).token_ids[0]
    model.generation_config.eos_token_id = first
    try:
        gen = Generator(model, tiny_generator.tokenizer)
        ours = assert_rows_equal_greedy(gen, prompts, GenerationParams(max_new_tokens=25, method="pid"))
    finally:
        model.generation_config.eos_token_id = 0
    assert ours[0].token_ids == (first,) and ours[0].finish_reason == "stop"


def test_stop_strings_per_row(tiny_generator):
    prompts = document_prompts(len(tiny_generator.tokenizer), 6, seed=3)
    free = greedy(tiny_generator, prompts[2], 20).text
    stop = (free[4:6],) if len(free) > 6 else ("e",)
    assert_rows_equal_greedy(tiny_generator, prompts, GenerationParams(max_new_tokens=30, stop=stop, method="pid"))


@pytest.mark.parametrize("copy_k", [4, 16, None])
def test_pid_llma_rows_equal_greedy_on_tiny_models(tiny_generator, copy_k, monkeypatch):
    # auto draft lengths follow the machine's measured cost curve, on which a tiny model's
    # fixed per-forward overhead can make every draft look too dear: a curve on which long
    # drafts pay keeps the auto path drafting on any machine
    from ragdec.decoding import llma
    from ragdec.decoding.cost import ForwardCost

    monkeypatch.setattr(llma, "forward_cost", lambda model, name: ForwardCost(tuple(1.0 + 0.01 * k for k in range(17))))
    prompts = document_prompts(len(tiny_generator.tokenizer), 6, seed=4)
    # references holding the rows' own greedy answers make long drafts that stand, and
    # drafts of different lengths per row (rows then keep different cache lengths)
    answers = [greedy(tiny_generator, p, 30).text for p in prompts[:3]]
    options = {} if copy_k is None else {"copy_k": copy_k}
    params = GenerationParams(max_new_tokens=30, method="pid-llma", options=options)
    ours = assert_rows_equal_greedy(tiny_generator, prompts, params, references=answers)
    assert sum(g.stats.accepted_tokens for g in ours) > 0  # the copy path is really exercised


@pytest.mark.parametrize("share", ["view", "copy"])
def test_dropping_unused_columns_keeps_rows_equal(tiny_generator, monkeypatch, share):
    import ragdec.decoding.batch_kv as batch_kv

    monkeypatch.setattr(batch_kv, "COMPACT_AFTER", 1)  # compact after every step that leaves a dead column
    dropped = []
    compact = batch_kv.TransformersRows._compact

    def counting_compact(rows):
        before = rows.valid.shape[-1]
        compact(rows)
        dropped.append(before - rows.valid.shape[-1])

    monkeypatch.setattr(batch_kv.TransformersRows, "_compact", counting_compact)
    prompts = document_prompts(len(tiny_generator.tokenizer), 6, seed=10)
    answers = [greedy(tiny_generator, p, 24).text for p in prompts[:2]]
    # rows leave early where their answer reaches EOS: the 5th token of the longest row's answer
    model = tiny_generator.model
    model.generation_config.eos_token_id = greedy(tiny_generator, prompts[1], 5).token_ids[4]
    try:
        gen = Generator(model, tiny_generator.tokenizer)
        for method in ("pid", "pid-llma"):
            params = GenerationParams(max_new_tokens=24, method=method, options={"copy_k": 5} if method == "pid-llma" else {})
            assert_rows_equal_greedy(gen, prompts, params, references=answers, share=share)
    finally:
        model.generation_config.eos_token_id = 0
    assert sum(dropped) > 0  # columns really went


def test_stream_interleaves_rows_and_adds_up(tiny_generator):
    prompts = document_prompts(len(tiny_generator.tokenizer), 4, seed=6)
    params = GenerationParams(max_new_tokens=12, method="pid")
    texts, seen, finals = ["", "", "", ""], [], 0
    for i, chunk in pid_stream(tiny_generator, prompts, params):
        texts[i] += chunk.text
        seen.append(i)
        finals += chunk.finish_reason is not None
    assert finals == 4 and seen[:4] == [0, 1, 2, 3]
    assert texts == [g.text for g in pid_generate(tiny_generator, prompts, params)]


def test_unknown_batch_method_is_a_clear_error(tiny_generator):
    with pytest.raises(ValueError, match="pid decodes rows by"):
        pid_generate(tiny_generator, [[5, 6]], GenerationParams(method="bild"))


def test_pid_equals_greedy_on_smollm2(smollm2):
    passage = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. It was the entrance arch to the 1889 World's Fair."
    )
    questions = [
        "Who is the Eiffel Tower named after?",
        "When was the tower built, and what was it built for? Answer in two full sentences, please.",
        "Repeat the passage word for word.",
        "Where?",
        "Summarize the passage in one sentence.",
    ]
    prompts = [smollm2.prompt_ids(f"Passage: {passage}\n\nQuestion: {q}") for q in questions]
    assert shared_prefix_len(prompts) > 50
    for method in ("pid", "pid-llma"):
        params = GenerationParams(max_new_tokens=40, method=method)
        ours = assert_rows_equal_greedy(smollm2, prompts, params, references=[passage])
    assert ours[2].stats.accepted_tokens > 10  # the repeated passage is copied


def test_bench_methods_answer_like_greedy(tiny_generator):
    from ragdec.bench.pid import KNOWN_METHODS, _answer, load_documents

    documents = load_documents(str(DATA), limit=2)
    assert [d.dataset for d in documents] == ["squad", "squad", "coqa", "coqa"]
    assert len(documents[0].questions) >= len(documents[1].questions) and len(documents[2].questions) >= 10
    prompts = document_prompts(len(tiny_generator.tokenizer), 4, seed=9)
    expected = [greedy(tiny_generator, p, 12).token_ids for p in prompts]
    document = tiny_generator.decode_text(prompts[0][:60])
    for method in KNOWN_METHODS:
        assert _answer(method, tiny_generator, prompts, document, 12) == expected, method


def test_batch_draft_width_docstring_example():
    from ragdec.decoding.cost import ForwardCost
    from ragdec.decoding.loop import BatchDraftWidth

    policy = BatchDraftWidth(ForwardCost((0.2,) * 4 + (0.6,) * 13))
    assert (policy.seconds(4), policy.seconds(28)) == (0.2, 0.6)
    assert policy.width([0, 0, 0, 6]) == 0
    assert policy.width([6, 6, 6, 6]) == 6  # 4 * 4.46 tokens in 0.6 s beats 4 in 0.2 s
    assert BatchDraftWidth(None).width([0, 3, 1]) == 3  # no cost curve: drafts go whole
