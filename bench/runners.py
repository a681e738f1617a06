"""One timed run of one method on one prompt: ragdec's methods and the Hugging Face
baselines a user would otherwise pick, measured the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

HF_METHODS = ("hf-greedy", "hf-prompt-lookup", "hf-assisted", "hf-early-exit")


@dataclass(frozen=True)
class Run:
    token_ids: tuple[int, ...]  # generated tokens, EOS included
    ttft_s: float  # request start to the first new token (prefill)
    e2e_s: float  # request start to the last token
    forward_passes: int  # target-model forwards, prefill included
    drafted_tokens: int | None = None  # ragdec methods: draft tokens sent to verification
    accepted_tokens: int | None = None  # ragdec methods: draft tokens that stood

    @property
    def decode_s(self) -> float:
        return self.e2e_s - self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per decode second; None when there was no decode phase."""
        if len(self.token_ids) < 2 or self.decode_s <= 0:
            return None
        return (len(self.token_ids) - 1) / self.decode_s

    @property
    def tokens_per_forward(self) -> float | None:
        decode_forwards = self.forward_passes - 1
        return (len(self.token_ids) - 1) / decode_forwards if decode_forwards > 0 else None


class ForwardCounter:
    """Counts forward calls of a model (a pre-hook, so every path is seen)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives.

    generate() hands the streamer the prompt first, then the new tokens as they come.
    """

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def run_hf(
    method: str,
    generator,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    counter: ForwardCounter,
    assistant=None,
    prompt_lookup_num_tokens: int = 10,  # transformers' defaults
    max_matching_ngram_size: int = 2,
    exit_layer: int | None = None,
) -> Run:
    """model.generate(do_sample=False) as a user would call it, with or without a drafter.

    hf-early-exit is transformers' self-speculative ``assistant_early_exit``: the first
    ``exit_layer`` layers and the LM head draft, the whole model verifies (default: FREE's
    default exit layer, ``default_exit_layer``)."""
    import torch

    input_ids = torch.tensor([list(prompt_ids)])
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=generator.tokenizer.pad_token_id or generator.tokenizer.eos_token_id,
    )
    if method == "hf-prompt-lookup":
        kwargs.update(prompt_lookup_num_tokens=prompt_lookup_num_tokens, max_matching_ngram_size=max_matching_ngram_size)
    elif method == "hf-assisted":
        if assistant is None:
            raise ValueError("hf-assisted needs an assistant model (--assistant)")
        kwargs["assistant_model"] = assistant.model
        if assistant.tokenizer.get_vocab() != generator.tokenizer.get_vocab():
            # universal assisted decoding: the two tokenizers differ
            kwargs.update(tokenizer=generator.tokenizer, assistant_tokenizer=assistant.tokenizer)
    elif method == "hf-early-exit":
        from ragdec.decoding.free import default_exit_layer

        kwargs["assistant_early_exit"] = exit_layer or default_exit_layer(generator.model.config.num_hidden_layers)
    elif method != "hf-greedy":
        raise ValueError(f"unknown baseline {method!r}; baselines: {', '.join(HF_METHODS)}")
    clock = _FirstTokenClock()
    counter.count = 0
    start = time.perf_counter()
    with torch.inference_mode():
        out = generator.model.generate(input_ids, streamer=clock, **kwargs)
    end = time.perf_counter()
    new = tuple(out[0, len(prompt_ids) :].tolist())
    ttft = (clock.first_token_at or end) - start
    return Run(new, ttft, end - start, counter.count)


def run_ragdec(method: str, generator, prompt_ids: Sequence[int], references: Sequence[str], max_new_tokens: int, options: dict) -> Run:
    from ragdec.decoding.methods import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens, method=method, options=options)
    start = time.perf_counter()
    result = generator.generate(prompt_ids, params, references)
    end = time.perf_counter()
    # time to first token counts the method's set-up (e.g. indexing references) too
    ttft = (end - start) - result.stats.decode_seconds
    stats = result.stats
    return Run(result.token_ids, ttft, end - start, stats.forward_passes, stats.drafted_tokens, stats.accepted_tokens)
