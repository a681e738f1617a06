"""The batched loop and continuous batching: every row's answer equals the same request
decoded alone, token for token, however rows join, leave and mix methods."""

from __future__ import annotations

import random
import threading

import pytest

from ragdec.decoding.batch_kv import TransformersRows
from ragdec.decoding.generator import Generator, TextChunk
from ragdec.decoding.loop import BatchDecoder
from ragdec.decoding.methods import GenerationParams


def alone(generator: Generator, prompt, params: GenerationParams, references=()) -> TextChunk:
    """The request decoded by itself (the batch-of-one loop, no scheduler)."""
    assert generator.scheduler is None
    return generator.generate(prompt, params, references)


def random_prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(length)]


def run_steps(generator, requests, join_at, prefill_chunk=None, max_rows=None, rows_kv=TransformersRows, watch=None):
    """Drive a BatchDecoder by hand: request i joins before step ``join_at[i]``; ``watch``
    sees the decoder after every step. Returns each request's whole answer."""
    decoder = BatchDecoder(generator.model, prefill_chunk=prefill_chunk, max_rows=max_rows, rows_kv=rows_kv)
    chunks: dict[int, list[TextChunk]] = {i: [] for i in range(len(requests))}
    texts = {}
    from ragdec.decoding.text import TextStream

    step = 0
    pending = sorted(range(len(requests)), key=lambda i: join_at[i])
    while pending or decoder.busy:
        while pending and join_at[pending[0]] <= step:
            i = pending.pop(0)
            prompt, params, references = requests[i]
            row = generator.row(prompt, params, references)
            row.key = i
            texts[i] = TextStream(generator.decode_text, params.stop)
            decoder.add(row)
        for row, block in decoder.step():
            final = block.finish_reason is not None
            chunks[row.key].append(TextChunk(texts[row.key].push(block.token_ids, final), block.token_ids, block.finish_reason, block.stats))
        if watch is not None:
            watch(decoder)
        step += 1
    return [TextChunk.join(chunks[i]) for i in range(len(requests))]


def assert_equal(ours: TextChunk, expected: TextChunk, what: str):
    assert ours.token_ids == expected.token_ids, what
    assert (ours.text, ours.finish_reason) == (expected.text, expected.finish_reason), what


@pytest.mark.parametrize("prefill_chunk", [None, 7])
def test_rows_joining_mid_decode_equal_alone(tiny_generator, prefill_chunk):
    rng = random.Random(11)
    vocab = len(tiny_generator.tokenizer)
    requests, join_at = [], []
    for i in range(7):
        prompt = random_prompt(rng, vocab, rng.randrange(1, 60))
        method = "llma" if i % 2 else "greedy"
        params = GenerationParams(max_new_tokens=rng.randrange(1, 30), method=method, options={"copy_k": 4} if method == "llma" else {})
        references = [tiny_generator.decode_text(alone(tiny_generator, prompt, GenerationParams(max_new_tokens=30)).token_ids)] if method == "llma" else []
        requests.append((prompt, params, references))
        join_at.append(rng.randrange(0, 12))
    ours = run_steps(tiny_generator, requests, join_at, prefill_chunk)
    drafted = 0
    for i, (prompt, params, references) in enumerate(requests):
        assert_equal(ours[i], alone(tiny_generator, prompt, params, references), f"request {i}")
        drafted += ours[i].stats.drafted_tokens
    accepted = sum(g.stats.accepted_tokens for g in ours)
    assert 0 < accepted <= drafted  # copies were made and verified in the batch


class CountingRows(TransformersRows):
    """A second ``RowsKV`` the loop is given (``rows_kv``): the transformers one, counting
    the forwards it runs for each target model."""

    forwards: dict = {}

    def forward(self, inputs, positions):
        CountingRows.forwards[id(self.model)] = CountingRows.forwards.get(id(self.model), 0) + 1
        return super().forward(inputs, positions)


def test_rows_with_their_own_target_decode_alone(tiny_generator):
    """FREE's drafter brings its own target (``Drafter.target``): its rows decode alone on
    it, the others batch on the model, every answer equals the request alone, and all of
    it runs through the ``RowsKV`` the decoder was given."""
    rng = random.Random(17)
    vocab = len(tiny_generator.tokenizer)
    free = {"exit_layer": 1, "exit_threshold": 0.0, "adaptive": False, "max_stack": 4}
    requests = []
    for i in range(6):
        method, options = ("free-lossless", free) if i % 3 == 1 else ("greedy", {})
        params = GenerationParams(max_new_tokens=rng.randrange(4, 20), method=method, options=options)
        requests.append((random_prompt(rng, vocab, rng.randrange(2, 30)), params, []))
    together = []

    def watch(decoder):
        together.append([row.alone for row in decoder.rows])

    CountingRows.forwards = {}
    ours = run_steps(tiny_generator, requests, [0, 0, 1, 2, 2, 3], rows_kv=CountingRows, watch=watch)
    for i, (prompt, params, references) in enumerate(requests):
        assert_equal(ours[i], alone(tiny_generator, prompt, params, references), f"request {i}")
    assert all(len(rows) == 1 for rows in together if any(rows))  # a row with its own target is alone
    assert any(len(rows) > 1 for rows in together)  # the others did batch
    assert sum(g.stats.drafted_tokens for g, r in zip(ours, requests) if r[1].method == "free-lossless") > 0
    assert CountingRows.forwards.get(id(tiny_generator.model), 0) > 0 and len(CountingRows.forwards) > 1


def test_stop_strings_inside_drafts_and_eos(tiny_generator):
    rng = random.Random(3)
    vocab = len(tiny_generator.tokenizer)
    requests = []
    for i in range(6):
        prompt = random_prompt(rng, vocab, rng.randrange(5, 40))
        free = alone(tiny_generator, prompt, GenerationParams(max_new_tokens=30)).text
        stop = (free[6:8],) if len(free) > 8 else ()
        # the references hold the answer: the stop string sits inside a draft that stands
        requests.append((prompt, GenerationParams(max_new_tokens=30, stop=stop, method="llma", options={"copy_k": 8}), [free]))
    model = tiny_generator.model
    eos = alone(tiny_generator, requests[0][0], GenerationParams(max_new_tokens=4)).token_ids[3]
    model.generation_config.eos_token_id = eos  # some rows end at an EOS mid-draft
    try:
        gen = Generator(model, tiny_generator.tokenizer)
        ours = run_steps(gen, requests, [0, 0, 1, 2, 2, 5])
        for i, (prompt, params, references) in enumerate(requests):
            assert_equal(ours[i], alone(gen, prompt, params, references), f"request {i}")
    finally:
        model.generation_config.eos_token_id = 0
    assert any(g.finish_reason == "stop" for g in ours)


def test_max_rows_makes_rows_wait(tiny_generator):
    rng = random.Random(8)
    vocab = len(tiny_generator.tokenizer)
    requests = [(random_prompt(rng, vocab, rng.randrange(2, 30)), GenerationParams(max_new_tokens=12), []) for _ in range(5)]
    ours = run_steps(tiny_generator, requests, [0] * 5, prefill_chunk=5, max_rows=2)
    for i, (prompt, params, references) in enumerate(requests):
        assert_equal(ours[i], alone(tiny_generator, prompt, params), f"request {i}")


def test_a_cancelled_row_leaves_and_the_others_go_on(tiny_generator):
    rng = random.Random(5)
    vocab = len(tiny_generator.tokenizer)
    prompts = [random_prompt(rng, vocab, n) for n in (12, 30, 7)]
    params = GenerationParams(max_new_tokens=25)
    decoder = BatchDecoder(tiny_generator.model)
    for i, prompt in enumerate(prompts):
        row = tiny_generator.row(prompt, params)
        row.key = i
        decoder.add(row)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    step = 0
    while decoder.busy:
        if step == 6:
            decoder.cancel(1)
        for row, block in decoder.step():
            tokens[row.key].extend(block.token_ids)
        step += 1
    for i in (0, 2):
        assert tuple(tokens[i]) == alone(tiny_generator, prompts[i], params).token_ids
    assert 0 < len(tokens[1]) < 25


def test_scheduler_serves_concurrent_callers_each_their_own_answer(tiny_tokenizer):
    from conftest import tiny_causal_lm

    generator = Generator(tiny_causal_lm("qwen2", len(tiny_tokenizer), seed=3), tiny_tokenizer, name="tiny-scheduler")
    rng = random.Random(21)
    vocab = len(tiny_tokenizer)
    requests = []
    for i in range(8):
        prompt = random_prompt(rng, vocab, rng.randrange(1, 50))
        method = ("greedy", "llma", "pid")[i % 3]
        params = GenerationParams(max_new_tokens=rng.randrange(4, 30), method=method, options={"copy_k": 3} if method == "llma" else {})
        requests.append((prompt, params, [tiny_tokenizer.decode(prompt[::-1])]))
    expected = [alone(generator, *r) for r in requests]
    # a bad request among them fails alone
    requests.append(([5] * 600, GenerationParams(max_new_tokens=10), []))

    generator.start_batching(max_batch=3, prefill_chunk=6)
    try:
        results: dict[int, object] = {}

        def ask(i):
            try:
                results[i] = generator.generate(*requests[i])
            except ValueError as error:
                results[i] = error

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert generator.scheduler.alive and generator.scheduler.rows == 0
    finally:
        generator.stop_batching()
    for i, want in enumerate(expected):
        assert_equal(results[i], want, f"request {i}")
    assert isinstance(results[8], ValueError) and "context" in str(results[8])


def test_scheduler_reader_leaving_cancels_its_row(tiny_generator):
    generator = Generator(tiny_generator.model, tiny_generator.tokenizer, name="tiny-cancel")
    scheduler = generator.start_batching(max_batch=4)
    try:
        long = generator.stream([3, 4, 5, 6], GenerationParams(max_new_tokens=200))
        next(long)
        long.close()  # the client went away
        short = generator.generate([7, 8, 9], GenerationParams(max_new_tokens=10))
        assert len(short.token_ids) <= 10
        for _ in range(100):
            if scheduler.rows == 0:
                break
            threading.Event().wait(0.05)
        assert scheduler.rows == 0
    finally:
        generator.stop_batching()


def test_batched_rows_equal_alone_on_smollm2(smollm2):
    """A real model: chat prompts of different lengths joining a running batch, greedy and
    llma mixed, each answer as the request alone gives it."""
    questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "Explain in one sentence what a KV cache is.",
        "Write the numbers from one to ten in words.",
        "Who wrote Hamlet?",
    ]
    passage = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair."
    requests = []
    for i, question in enumerate(questions):
        prompt = smollm2.prompt_ids(f"{passage}\n\n{question}" if i % 2 else question)
        method = "llma" if i % 2 else "greedy"
        requests.append((prompt, GenerationParams(max_new_tokens=24, method=method), [passage]))
    ours = run_steps(smollm2, requests, [0, 0, 2, 3, 7], prefill_chunk=16)
    for i, (prompt, params, references) in enumerate(requests):
        assert_equal(ours[i], alone(smollm2, prompt, params, references), f"request {i}")


def test_a_conversation_keeps_one_history_and_a_shared_prefix_stays(tiny_generator):
    """Turn after turn a conversation's kept history replaces the one it grew from, so
    many live conversations fit the store; a prefix that several requests used stays."""
    from ragdec.decoding.kv import PrefixStore

    generator = Generator(tiny_generator.model, tiny_generator.tokenizer, name="tiny-prefixes")
    generator.prefixes = PrefixStore(capacity=4)
    params = GenerationParams(max_new_tokens=3)
    system = [5, 6, 7, 8]
    for conversation in range(3):  # the system prompt is kept by the first and used by the rest
        generator.generate(system + [20 + conversation], params, prefix_len=len(system))
    histories = {c: system + [30 + c, 31] for c in range(3)}
    for turn in range(4):
        for c, history in histories.items():
            answer = generator.generate(history + [40 + c], params, prefix_len=len(history))
            # from the second turn on, the prompt starts from the history kept by the turn before
            kept_before = len(history) - 2 if turn > 0 else len(system)
            assert answer.stats.reused_prompt_tokens == kept_before, (turn, c)
            histories[c] = history + [40 + c, *answer.token_ids[:1]]
    # one entry per conversation and the shared system prompt: nothing was evicted
    assert len(generator.prefixes) == 4
    assert generator.prefixes.longest(system + [99])[1] == len(system)
