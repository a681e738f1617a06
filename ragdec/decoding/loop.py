"""The one decode loop: prefill, then propose, verify, accept, crop until a stop.

Plain greedy decoding is this loop with a drafter that proposes nothing: each verify is
then one forward over one token, which is exactly what ``model.generate(do_sample=False)``
does, minus its per-step bookkeeping.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from .kv import PrefixStore, crop_to, new_cache
from .seam import AcceptanceRule, Block, DecodeStats, Drafter
from .stopping import StopCondition


def prefill(model, prompt_ids: Sequence[int], cache):
    """Run the prompt through the model; return the logits of its last position, [1, vocab].

    Only the last position's logits are computed (``logits_to_keep=1``): for a prompt of
    1,000 tokens the full [1000, vocab] matrix would cost more than the answer's first steps.
    """
    import torch

    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, P]
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1:]  # [1, vocab]


def verify(model, last_token: int, draft: Sequence[int], cache):
    """One forward over ``[last_token, *draft]``; return its logits, [k + 1, vocab]."""
    import torch

    input_ids = torch.tensor([[last_token, *draft]], dtype=torch.long)  # [1, k + 1]
    out = model(
        input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=len(draft) + 1
    )
    return out.logits[0]


def decode(
    model,
    prompt_ids: Sequence[int],
    drafter: Drafter,
    acceptance: AcceptanceRule,
    stop: StopCondition,
    detokenize,
    prefixes: PrefixStore | None = None,
    prefix_len: int = 0,
) -> Iterator[Block]:
    """Decode from ``prompt_ids``, yielding the accepted tokens of each step.

    Args:
        model: a causal LM whose forward takes ``past_key_values`` and ``logits_to_keep``.
        prompt_ids: the full prompt, chat template applied.
        drafter: proposes draft tokens (``greedy.NoDraft`` for plain greedy).
        acceptance: keeps a prefix of each draft plus one target token.
        stop: EOS ids, stop strings and the token budget.
        detokenize: token ids -> text, for stop strings.
        prefixes, prefix_len: reuse the KV of ``prompt_ids[:prefix_len]`` (a fixed system
            prompt, a conversation's history) from ``prefixes`` when kept there, and keep it
            there when not. The prompt is then prefilled in two parts, which every
            request sharing that prefix does alike.

    Yields:
        Blocks of new token ids; the last one carries ``finish_reason`` and ``stats``.
    """
    import torch

    if stop.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {stop.max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(prompt_ids) + stop.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({stop.max_new_tokens}) exceeds "
            f"the model's context of {limit} tokens: shorten the prompt or lower max_new_tokens"
        )

    tokens = list(prompt_ids)
    prompt_len = len(tokens)
    forward_passes = drafted_total = accepted_total = 0
    start = time.perf_counter()
    with torch.inference_mode():
        # 1. prefill: the prompt fills the cache; the acceptance rule picks the first
        #    token from its last logits, as from a verify over an empty draft
        cache, cached, start_at = None, 0, 0  # cached: reused from ``prefixes``
        prefix_len = min(prefix_len, len(tokens) - 1)  # the last prompt token gives the logits
        if prefixes is not None and prefix_len > 0:
            cache, cached = prefixes.longest(tokens[:prefix_len])
            cache = cache if cache is not None else new_cache(model)
            if cached < prefix_len:
                prefill(model, tokens[cached:prefix_len], cache)
                prefixes.keep(tokens[:prefix_len], cache)
            start_at = prefix_len
        else:
            cache = new_cache(model)
        first = acceptance.accept([], prefill(model, tokens[start_at:], cache))[0]
        forward_passes += 1
        prefill_seconds = time.perf_counter() - start
        tokens.append(first)
        finish = stop.first_stop(tokens[prompt_len:], 0, detokenize)

        def stats() -> DecodeStats:
            return DecodeStats(
                forward_passes=forward_passes,
                new_tokens=len(tokens) - prompt_len,
                drafted_tokens=drafted_total,
                accepted_tokens=accepted_total,
                seconds=time.perf_counter() - start,
                prefill_seconds=prefill_seconds,
                prompt_tokens=prompt_len,
                reused_prompt_tokens=cached,
                drafter_forward_passes=getattr(drafter, "forward_passes", 0),
            )

        if finish:
            yield Block((first,), finish[1], stats())
            return
        yield Block((first,))

        while True:
            # 2. propose: the bonus token always comes on top of the draft, so a draft
            #    may use all but one of the tokens left in the budget
            room = stop.max_new_tokens - (len(tokens) - prompt_len) - 1
            draft = drafter.propose(tokens, room) if room > 0 else []
            # 3. verify: the cache holds every token but the last; one forward covers
            #    the last token and the draft
            logits = verify(model, tokens[-1], draft, cache)
            forward_passes += 1
            # 4. accept: a prefix of the draft, then one token of the target's own
            accepted = acceptance.accept(draft, logits)
            accepted_len = len(accepted) - 1
            drafted_total += len(draft)
            accepted_total += accepted_len
            # 5. crop: keep the cache for tokens up to and including the accepted draft
            #    prefix; the target's own token is not in the cache yet
            if accepted_len < len(draft):
                crop_to(cache, len(tokens) + accepted_len)
            step_start = len(tokens) - prompt_len
            tokens.extend(accepted)
            drafter.observe(tokens, len(draft), accepted_len)

            finish = stop.first_stop(tokens[prompt_len:], step_start, detokenize)
            if finish:
                keep, reason = finish
                del tokens[prompt_len + keep :]
                yield Block(tuple(tokens[prompt_len + step_start :]), reason, stats())
                return
            yield Block(tuple(accepted))
