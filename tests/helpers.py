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
