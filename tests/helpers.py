"""Helpers shared by the tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy
import random

import torch

from ragdec.decoding.generator import Generator


def hf_greedy(generator: Generator, prompt_ids, max_new_tokens: int, **kwargs) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = generator.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=generator.tokenizer.pad_token_id or 0,
            **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


def random_prompts(vocab_size: int, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


def noisy_copy(model, noise: float, seed: int = 1):
    """The model with Gaussian noise on every weight: it agrees with the original on about
    60% of the tokens at noise 0.2, so drafts stand sometimes and roll back sometimes."""
    little = copy.deepcopy(model)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in little.parameters():
            param.add_(torch.randn(param.shape, generator=rng) * noise * param.std())
    return little


def small_qwen2(vocab_size: int, hidden_size: int, intermediate_size: int, layers: int, seed: int):
    """A random qwen2 with clear-cut argmax decisions (embeddings scaled up), for sizes the
    session's tiny models do not have."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 1
    return model
