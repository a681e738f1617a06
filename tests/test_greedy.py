"""The greedy loop equals model.generate(do_sample=False), token for token."""

from __future__ import annotations

import pytest
from helpers import hf_greedy, random_prompts

from ragdec.decoding.generator import Generator
from ragdec.decoding.methods import GenerationParams


def test_greedy_equals_generate_on_tiny_models(tiny_generator):
    for prompt in random_prompts(len(tiny_generator.tokenizer), 24):
        ours = tiny_generator.generate(prompt, GenerationParams(max_new_tokens=30))
        assert list(ours.token_ids) == hf_greedy(tiny_generator, prompt, 30)
        assert ours.stats.new_tokens == len(ours.token_ids)
        assert ours.stats.forward_passes == len(ours.token_ids)  # one forward per token


def test_greedy_stops_at_eos_like_generate(tiny_generator):
    prompts = random_prompts(len(tiny_generator.tokenizer), 12, seed=1)
    model = tiny_generator.model
    for prompt in prompts:
        # make the 4th greedy token the end-of-sequence token, so EOS is certain to occur
        free_run = hf_greedy(tiny_generator, prompt, 6)
        eos = free_run[3]
        model.generation_config.eos_token_id = eos
        try:
            gen = Generator(model, tiny_generator.tokenizer)
            ours = gen.generate(prompt, GenerationParams(max_new_tokens=20))
            expected = hf_greedy(gen, prompt, 20, eos_token_id=eos)
        finally:
            model.generation_config.eos_token_id = 0
        assert list(ours.token_ids) == expected
        assert ours.token_ids[-1] == eos and ours.finish_reason == "stop"
        assert eos not in ours.token_ids[:-1]


def test_length_finish_reason(tiny_generator):
    ours = tiny_generator.generate([5, 6, 7], GenerationParams(max_new_tokens=1))
    assert len(ours.token_ids) == 1 and ours.finish_reason == "length"


def test_stop_strings_cut_tokens_and_text(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    for prompt in random_prompts(len(tokenizer), 12, seed=2):
        full = tiny_generator.generate(prompt, GenerationParams(max_new_tokens=24))
        text = full.text
        if len(text) < 6:
            continue
        stop = text[3:5]  # two characters from inside the answer
        ours = tiny_generator.generate(prompt, GenerationParams(max_new_tokens=24, stop=(stop,)))
        # tokens stop at the first token whose text completes the stop string
        cut = next(i for i in range(1, len(full.token_ids) + 1) if stop in tokenizer.decode(full.token_ids[:i]))
        assert list(ours.token_ids) == list(full.token_ids[:cut])
        assert ours.text == text[: text.find(stop)]
        assert ours.finish_reason == "stop"


def test_streamed_text_is_the_whole_text(tiny_generator):
    prompt = tiny_generator.tokenizer("The quick brown fox")["input_ids"]
    chunks = list(tiny_generator.stream(prompt, GenerationParams(max_new_tokens=25)))
    assert "".join(c.text for c in chunks) == tiny_generator.decode_text([t for c in chunks for t in c.token_ids])
    assert chunks[-1].stats is not None and all(c.stats is None for c in chunks[:-1])


def test_prompt_too_long_is_a_clear_error(tiny_generator):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_generator.generate([5] * 500, GenerationParams(max_new_tokens=20))


def test_greedy_equals_generate_on_smollm2(smollm2):
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain what a KV cache is in one sentence.",
        "Translate 'good morning' into German.",
        "Who wrote Hamlet?",
    ]
    for question in questions:
        prompt = smollm2.prompt_ids(question)
        ours = smollm2.generate(prompt, GenerationParams(max_new_tokens=40))
        assert list(ours.token_ids) == hf_greedy(smollm2, prompt, 40)
