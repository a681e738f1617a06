"""Forced decoding, the LLMA paper's own measure of the copy mechanism's reach: the
output is fixed in advance (a reference answer), the model still runs every forward, and
the forced text, not the model's argmax, decides what stands.

``forced`` is the one-token-per-forward baseline; ``llma-forced`` drafts copies from the
references as LLMA does, and a draft token stands where it equals the forced token.
"""

from __future__ import annotations

from typing import Sequence

from ragdec.decoding.cost import forward_cost
from ragdec.decoding.greedy import NoDraft
from ragdec.decoding.llma import LLMADrafter, LLMAMemory, build_index, llma_config
from ragdec.decoding.methods import register_method


class ForcedAcceptance:
    """Keep the draft prefix that equals the forced tokens, then the next forced token.

    Example: forced [4, 8, 15, 16, 23], 2 tokens already stand, draft [15, 99]: 15 matches,
    99 != 16, so accept [15, 16].
    """

    def __init__(self, forced_ids: Sequence[int]):
        self.forced_ids = list(forced_ids)
        self.position = 0  # forced tokens that stand so far

    def accept(self, draft: Sequence[int], logits) -> list[int]:
        expected = self.forced_ids[self.position : self.position + len(draft) + 1]
        accepted_len = 0
        while accepted_len < len(draft) and accepted_len < len(expected) - 1 and draft[accepted_len] == expected[accepted_len]:
            accepted_len += 1
        out = [*draft[:accepted_len], expected[accepted_len]]
        self.position += len(out)
        return out


def _forced(generator, params):
    answer = params.options.get("forced_answer")
    if not answer:
        raise ValueError("forced decoding needs a forced_answer (workload rag-forced provides it)")
    ids = generator.tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = min(generator.eos_token_ids)
    return ForcedAcceptance([*ids, eos])


@register_method("forced")
def _forced_greedy(generator, prompt_ids, references, params):
    return NoDraft(), _forced(generator, params)


@register_method("llma-forced")
def _llma_forced(generator, prompt_ids, references, params):
    options = {k: v for k, v in params.options.items() if k != "forced_answer"}
    config = llma_config(options)
    # the paper's setting: this request's references only, no memory of earlier answers;
    # draft lengths from the cost model, whose estimates learn acceptance against the
    # forced text as they would against the model's argmax
    cost = forward_cost(generator.model, generator.name) if config.copy_k is None else None
    drafter = LLMADrafter(build_index(generator.tokenizer, references, config), config, cost, LLMAMemory())
    return drafter, _forced(generator, params)
