"""Encoder-decoder PiD: every row equals generating that question alone (random T5 configs)."""

from __future__ import annotations

import random

import pytest
import torch

from ragdec.decoding.pid_encdec import encdec_pid_generate


def tiny_t5(seed: int = 0, **overrides):
    """A randomly initialised small T5; odd sizes catch shape bugs."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=97, d_model=40, d_kv=10, d_ff=72, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # clear-cut argmax decisions (see conftest's tiny_causal_lm)
        model.shared.weight.mul_(8.0)
    return model


def alone(model, document, question, max_new_tokens):
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([document]), decoder_input_ids=torch.tensor([[0, *question]]),
            do_sample=False, max_new_tokens=max_new_tokens,
        )
    new = out[0, len(question) + 1 :].tolist()
    end = next((i + 1 for i, t in enumerate(new) if t == model.generation_config.eos_token_id), len(new))
    return new[:end]


@pytest.mark.parametrize("seed", [0, 1])
def test_encdec_pid_rows_equal_each_question_alone(seed):
    model = tiny_t5(seed)
    rng = random.Random(seed)
    document = [rng.randrange(2, 97) for _ in range(50)]
    questions = [[rng.randrange(2, 97) for _ in range(n)] for n in (1, 12, 3, 0, 7)]
    for max_new_tokens in (1, 20):
        ours = encdec_pid_generate(model, document, questions, max_new_tokens)
        assert ours == [alone(model, document, q, max_new_tokens) for q in questions]


def test_encdec_pid_rows_that_stop_at_eos_leave_the_batch():
    model = tiny_t5(2)
    rng = random.Random(2)
    document = [rng.randrange(2, 97) for _ in range(30)]
    questions = [[rng.randrange(2, 97) for _ in range(n)] for n in (2, 9, 5, 1)]
    # make the 3rd token of the second row's answer the EOS
    eos = alone(model, document, questions[1], 3)[2]
    model.generation_config.eos_token_id = eos
    ours = encdec_pid_generate(model, document, questions, 20)
    assert ours == [alone(model, document, q, 20) for q in questions]
    assert ours[1][-1] == eos and len(ours[1]) <= 3
    assert any(len(a) == 20 for a in ours)  # other rows went on after it left
