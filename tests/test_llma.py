"""LLMA equals greedy decoding token for token, whatever the references hold."""

from __future__ import annotations

import json
import random

import pytest

from ragdec.decoding import cost as cost_module
from ragdec.decoding.cost import CURVE_VERSION, MAX_DRAFT, ForwardCost, forward_cost
from ragdec.decoding.generator import Generator
from ragdec.decoding.llma import reference_variants
from ragdec.decoding.methods import GenerationParams

from helpers import random_prompts


def greedy(generator: Generator, prompt, max_new_tokens=40, stop=()):
    return generator.generate(prompt, GenerationParams(max_new_tokens=max_new_tokens, stop=stop))


def llma(generator: Generator, prompt, references, max_new_tokens=40, stop=(), **options):
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=stop, method="llma", options=options)
    return generator.generate(prompt, params, references)


def reference_cases(generator: Generator, answer_ids, rng: random.Random) -> dict[str, list[str]]:
    """References that the answer copies whole, partly, not at all, or that are odd."""
    decode = generator.decode_text
    answer = decode(answer_ids)
    half = len(answer_ids) // 2
    corrupted = list(answer_ids)
    for i in range(0, len(corrupted), 5):
        corrupted[i] = rng.randrange(2, len(generator.tokenizer))
    return {
        "whole": [answer],
        "partly": [decode(answer_ids[:half]), decode(corrupted)],
        "none": [decode([rng.randrange(2, len(generator.tokenizer)) for _ in range(60)])],
        "empty": [],
        "empty-strings": ["", ""],
        "repeated": [answer] * 3 + [decode(answer_ids[half:])] * 2,
        "longer-than-context": [answer * 40],
    }


@pytest.mark.parametrize("copy_k", [1, 4, 16])
def test_llma_equals_greedy_on_tiny_models(tiny_generator, copy_k):
    rng = random.Random(copy_k)
    for prompt in random_prompts(len(tiny_generator.tokenizer), 8, seed=copy_k):
        expected = greedy(tiny_generator, prompt)
        for case, references in reference_cases(tiny_generator, expected.token_ids, rng).items():
            ours = llma(tiny_generator, prompt, references, copy_k=copy_k)
            assert ours.token_ids == expected.token_ids, case
            assert ours.text == expected.text, case
        whole = llma(tiny_generator, prompt, [expected.text], copy_k=copy_k)
        if copy_k > 1 and len(expected.token_ids) > 8:
            assert whole.stats.accepted_tokens > 0  # the copy path is really exercised


def test_llma_copies_cut_at_eos_and_stop_strings(tiny_generator):
    model = tiny_generator.model
    for prompt in random_prompts(len(tiny_generator.tokenizer), 8, seed=7):
        free_run = greedy(tiny_generator, prompt, 12)
        # EOS inside a draft: make the 6th token EOS; the reference holds the whole run
        eos = free_run.token_ids[5]
        model.generation_config.eos_token_id = eos
        try:
            gen = Generator(model, tiny_generator.tokenizer)
            expected = greedy(gen, prompt, 30)
            ours = llma(gen, prompt, [free_run.text], 30, copy_k=10)
        finally:
            model.generation_config.eos_token_id = 0
        assert ours.token_ids == expected.token_ids and ours.finish_reason == "stop"
        # a stop string inside a draft
        text = free_run.text
        if len(text) > 8:
            stop = (text[5:7],)
            expected = greedy(tiny_generator, prompt, 30, stop)
            ours = llma(tiny_generator, prompt, [text], 30, stop, copy_k=10)
            assert (ours.token_ids, ours.text) == (expected.token_ids, expected.text)


def test_cost_model_drafts_only_what_pays():
    cost = ForwardCost((0.12, 0.14, 0.15, 0.17, 0.25))
    assert cost.best_draft_len(0.5, 4) == 2  # the docstring's example
    assert cost.best_draft_len(0.1, 4) == 0
    assert cost.best_draft_len(0.99, 4) == 3  # 3.94 tokens in 0.17 s beats 4.90 in 0.25 s
    assert cost.best_draft_len(0.99, 1) == 1  # never more than is available


def test_cost_curve_times_every_draft_length_and_remeasures_old_records(tiny_generator, tmp_path, monkeypatch):
    """A record from before every length was timed (interpolated between a few) is measured
    again; the new one holds a non-decreasing cost for each draft length 0..MAX_DRAFT."""
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMO", {})
    forward_cost(tiny_generator.model, "tiny")
    (path,) = (tmp_path / "costs").iterdir()
    stale = {"model": "tiny", "seconds": [9.0] * (MAX_DRAFT + 1)}  # no version: the old format
    path.write_text(json.dumps(stale))
    monkeypatch.setattr(cost_module, "_MEMO", {})
    cost = forward_cost(tiny_generator.model, "tiny")
    record = json.loads(path.read_text())
    assert record["version"] == CURVE_VERSION and len(record["seconds"]) == MAX_DRAFT + 1
    assert list(cost.seconds) == record["seconds"] and max(cost.seconds) < 9.0
    assert all(a <= b for a, b in zip(cost.seconds, cost.seconds[1:]))


def test_reference_variants_docstring_example():
    assert reference_variants("Paris is big. It has 2M people.") == [
        "Paris is big. It has 2M people.",
        " Paris is big. It has 2M people.",
        " It has 2M people.",
    ]


def test_unknown_option_is_a_clear_error(tiny_generator):
    with pytest.raises(ValueError, match="unknown llma option"):
        llma(tiny_generator, [5, 6], ["x"], trigger=3)


def test_llma_equals_greedy_on_smollm2(smollm2):
    passage = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. It was the entrance arch to the 1889 World's Fair."
    )
    questions = [
        "Who is the Eiffel Tower named after?",
        "When was the tower built?",
        "Repeat the passage word for word.",
        "Where is the tower?",
        "Summarize the passage in one sentence.",
    ]
    for question in questions:
        prompt = smollm2.prompt_ids(f"Passage: {passage}\n\nQuestion: {question}")
        expected = greedy(smollm2, prompt, 48)
        for options in ({}, {"copy_k": 8}, {"trigger_n": 1, "copy_k": 4}):
            ours = llma(smollm2, prompt, [passage], 48, **options)
            assert ours.token_ids == expected.token_ids, (question, options)


def test_acceptance_estimate_docstring_example():
    from ragdec.decoding.llma import AcceptanceEstimate

    estimate = AcceptanceEstimate(max_draft=16)
    situation = (4, 1)
    for _ in range(3):
        estimate.update(situation, 16, 16)
    estimate.update(situation, 16, 2)
    pooled = estimate.rate(situation)
    assert round(pooled, 2) == 0.96
    curve = estimate.survival(situation)
    p1 = (4 + 2 * pooled) / (4 + 2)
    assert curve[0] == pytest.approx(p1) and curve[1] == pytest.approx(p1 * p1)
    assert curve[2] / curve[1] == pytest.approx((3 + 2 * pooled) / (4 + 2))
    # a survival curve steers the cost model like a flat rate does
    cost = ForwardCost((0.12, 0.14, 0.15, 0.17, 0.25))
    assert cost.best_draft_len([0.5, 0.25, 0.125, 0.0625], 4) == cost.best_draft_len(0.5, 4) == 2
