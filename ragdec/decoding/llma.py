"""LLMA: copy spans of the references into the answer and verify them in one forward.

The drafter looks up the last decoded tokens in an n-gram index of the references (the
prompt itself, passages, cached answers, past turns, the answer so far) and proposes the
tokens that follow the match. Acceptance is ``ExactMatch``, so the output is the model's
greedy output token for token. The draft length is chosen per step from the measured
cost of a forward on this machine and the acceptance seen so far (see ``cost.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cost import ForwardCost, forward_cost
from .greedy import ExactMatch
from .methods import register_method
from .reference_index import ReferenceIndex


@dataclass(frozen=True)
class LLMAConfig:
    trigger_n: int = 2  # shortest match that triggers a copy; 1 matches too much on CPUs
    max_n: int = 6  # longest match looked for; longer matches predict the copy better
    copy_k: int | None = None  # fixed draft length; None: chosen per step by the cost model
    max_copy: int = 16  # longest draft the cost model may choose
    variants: bool = True  # index each reference in its in-context tokenizations too


def reference_variants(text: str) -> list[str]:
    """Texts whose tokenizations cover how a reference's words appear inside an answer.

    A reference tokenized on its own starts without a leading space, while inside an
    answer the same words usually follow a space (byte-level BPE: "Paris" vs " Paris");
    sentences inside the reference start afresh after ". ". So each reference is indexed
    as is, after a space, and sentence by sentence after a space.

    Example: "Paris is big. It has 2M people." -> ["Paris is big. It has 2M people.",
    " Paris is big. It has 2M people.", " It has 2M people."]
    """
    variants = [text, " " + text]
    for sentence in _sentences(text)[1:]:
        variants.append(" " + sentence)
    return variants


def _sentences(text: str) -> list[str]:
    out, start = [], 0
    for i, ch in enumerate(text):
        if ch in ".!?\n" and i + 1 < len(text) and text[i + 1] in " \n":
            out.append(text[start : i + 1].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


class AcceptanceEstimate:
    """Per match length, the chance that a draft token is accepted, as a Beta posterior
    on a geometric model: every accepted token is a success, every draft cut short one
    failure. The prior (3 successes, 1 failure) trusts a fresh match moderately."""

    PRIOR_ACCEPTED, PRIOR_REJECTED = 3.0, 1.0

    def __init__(self):
        self._accepted: dict[int, float] = {}
        self._rejected: dict[int, float] = {}

    def rate(self, match_len: int) -> float:
        a = self._accepted.get(match_len, 0.0) + self.PRIOR_ACCEPTED
        r = self._rejected.get(match_len, 0.0) + self.PRIOR_REJECTED
        return a / (a + r)

    def update(self, match_len: int, drafted: int, accepted: int) -> None:
        self._accepted[match_len] = self._accepted.get(match_len, 0.0) + accepted
        if accepted < drafted:
            self._rejected[match_len] = self._rejected.get(match_len, 0.0) + 1


class LLMADrafter:
    """Proposes copies from the references; learns which match lengths pay."""

    def __init__(self, index: ReferenceIndex, config: LLMAConfig, cost: ForwardCost | None):
        self.index = index
        self.config = config
        self.cost = cost
        self.estimate = AcceptanceEstimate()
        self._self_seq: int | None = None  # the prompt and answer, indexed as they grow
        self._last_match_len = 0

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        if self._self_seq is None:
            self._self_seq = self.index.add(tokens)
        else:
            self.index.extend(self._self_seq, tokens[len(self.index.sequences[self._self_seq]) :])
        limit = min(max_tokens, self.config.copy_k or self.config.max_copy)
        match = self.index.lookup(tokens, limit) if limit > 0 else None
        if match is None:
            return []
        self._last_match_len = match.match_len
        if self.config.copy_k is not None or self.cost is None:
            return list(match.continuation)
        k = self.cost.best_draft_len(self.estimate.rate(match.match_len), len(match.continuation))
        return list(match.continuation[:k])

    def observe(self, tokens: Sequence[int], drafted: int, accepted: int) -> None:
        if drafted:
            self.estimate.update(self._last_match_len, drafted, accepted)


def build_index(tokenizer, references: Sequence[str], config: LLMAConfig) -> ReferenceIndex:
    """Tokenize the references (and their variants) into an n-gram index."""
    index = ReferenceIndex(config.trigger_n, config.max_n)
    texts = [v for ref in references if ref for v in (reference_variants(ref) if config.variants else [ref])]
    if texts:
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            index.add(ids)
    return index


def llma_config(options) -> LLMAConfig:
    known = LLMAConfig.__dataclass_fields__
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"unknown llma option(s) {sorted(unknown)}; options: {', '.join(known)}")
    values = dict(options)
    if values.get("copy_k") in ("auto", None):
        values["copy_k"] = None
    for name in ("trigger_n", "max_n", "copy_k", "max_copy"):
        if values.get(name) is not None:
            values[name] = int(values[name])
    if "variants" in values and isinstance(values["variants"], str):
        values["variants"] = values["variants"].lower() in ("1", "true", "yes", "context")
    return LLMAConfig(**values)


@register_method("llma")
def _llma(generator, prompt_ids, references, params):
    config = llma_config(params.options)
    index = build_index(generator.tokenizer, references, config)
    cost = forward_cost(generator.model, generator.name) if config.copy_k is None else None
    return LLMADrafter(index, config, cost), ExactMatch()
