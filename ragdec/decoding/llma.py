"""LLMA: copy spans of the references into the answer and verify them in one forward.

The drafter looks up the last decoded tokens in an n-gram index of the references (the
prompt itself, passages, cached answers, past turns, the answer so far) and proposes the
tokens that follow the match. Acceptance is ``ExactMatch``, so the output is the model's
greedy output token for token. The draft length is chosen per step from the measured
cost of a forward on this machine and the acceptance seen so far (see ``cost.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .cost import ForwardCost, forward_cost
from .greedy import ExactMatch
from .methods import knob, method_config, method_options, register_method
from .reference_index import ReferenceIndex
from .seam import Drafter


@method_options("llma")
@dataclass(frozen=True)
class LLMAConfig:
    # 1: even a one-token match may copy, since the cost model drafts little on weak matches
    trigger_n: int = knob(1, "shortest match that triggers a copy")
    max_n: int = knob(6, "longest match looked for")  # longer matches predict the copy better
    copy_k: int | None = knob(None, "draft length, or auto to choose it per step from the cost model (default auto)")
    max_copy: int = knob(16, "longest draft the cost model may choose")
    variants: bool = knob(True, "index each reference in its in-context tokenizations too")
    memory: bool = knob(True, "learn acceptance across requests and copy from recent answers")


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
    """How far a draft is likely to stand: for each draft position j, the chance that
    token j stands given that the tokens before it did, learnt per situation.

    A situation is how long the match is (1, 2, 3, 4+ tokens) and how many drafts in a
    row stood whole (0, 1, 2, 3+): inside a span that is being copied the next draft is
    far more likely to stand than after a miss, and more so the longer the copy has run
    (an answer repeating an earlier one word for word runs to its end, where a copied
    phrase stops after a few tokens). Each position's chance is shrunk towards the
    situation's pooled rate (every accepted token a success, every draft cut short a
    failure, prior 3:1), so positions that long drafts have rarely reached borrow from
    the short ones. The product of the chances gives the survival curve that the cost
    model weighs against the cost of each draft length.

    Example: in one situation, drafts of 16 stood whole 3 times and stopped after 2 once:
    position 1 and 2 survived 4 of 4, position 3 survived 3 of 4; pooled rate
    (3 + 50) / (3 + 50 + 1 + 1) = 0.96, so position 3's chance is
    (3 + 2 * 0.96) / (4 + 2) = 0.82.
    """

    PRIOR_ACCEPTED, PRIOR_REJECTED = 3.0, 1.0
    SHRINKAGE = 2.0  # pseudo-observations of the pooled rate at each position

    def __init__(self, max_draft: int = 16):
        self.max_draft = max_draft
        self._accepted: dict[tuple[int, int], float] = {}
        self._rejected: dict[tuple[int, int], float] = {}
        self._reached: dict[tuple[int, int], list[int]] = {}  # [j]: drafts that got to position j + 1
        self._stood: dict[tuple[int, int], list[int]] = {}  # [j]: of those, token j + 1 stood

    @staticmethod
    def situation(match_len: int, streak: int) -> tuple[int, int]:
        """``streak``: the drafts in a row that stood whole, up to this one."""
        return min(match_len, 4), min(streak, 3)

    def rate(self, situation: tuple[int, int]) -> float:
        a = self._accepted.get(situation, 0.0) + self.PRIOR_ACCEPTED
        r = self._rejected.get(situation, 0.0) + self.PRIOR_REJECTED
        return a / (a + r)

    def survival(self, situation: tuple[int, int]) -> list[float]:
        pooled = self.rate(situation)
        reached = self._reached.get(situation, [0] * self.max_draft)
        stood = self._stood.get(situation, [0] * self.max_draft)
        curve, alive = [], 1.0
        for j in range(self.max_draft):
            alive *= (stood[j] + self.SHRINKAGE * pooled) / (reached[j] + self.SHRINKAGE)
            curve.append(alive)
        return curve

    def update(self, situation: tuple[int, int], drafted: int, accepted: int) -> None:
        self._accepted[situation] = self._accepted.get(situation, 0.0) + accepted
        if accepted < drafted:
            self._rejected[situation] = self._rejected.get(situation, 0.0) + 1
        reached = self._reached.setdefault(situation, [0] * self.max_draft)
        stood = self._stood.setdefault(situation, [0] * self.max_draft)
        for j in range(min(accepted + 1, drafted, self.max_draft)):
            reached[j] += 1
            stood[j] += j < accepted


class LLMAMemory:
    """What LLMA keeps across the requests of one generator: the acceptance it has seen
    and its recent answers. An answer often repeats phrasing of earlier ones ("According
    to the passages, ..."), so recent answers are indexed as references too (the oldest
    of them, ranking below every reference of the request itself). Copies are still
    verified, so nothing of an earlier answer reaches a new one unless the model itself
    would say it."""

    def __init__(self, max_answers: int = 32):
        self.estimate = AcceptanceEstimate(max_draft=16)
        self.answers: deque[list[int]] = deque(maxlen=max_answers)


class LLMADrafter(Drafter):
    """Proposes copies from the references; learns which situations pay."""

    def __init__(self, index: ReferenceIndex, config: LLMAConfig, cost: ForwardCost | None, memory: LLMAMemory):
        self.index = index
        self.config = config
        self.cost = cost  # the contract's: the batch cuts drafts by it too
        self.memory = memory
        self._self_seq: int | None = None  # the prompt and answer, indexed as they grow
        self._answer: list[int] = []  # this request's answer, shared with the memory
        self._prompt_len = 0
        self._situation = (0, 0)
        self._streak = 0  # drafts in a row that stood whole

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        if self._self_seq is None:
            self._self_seq = self.index.add(tokens)
            self._prompt_len = len(tokens) - 1  # the first answer token is already there
            self.memory.answers.append(self._answer)
        else:
            self.index.extend(self._self_seq, tokens[len(self.index.sequences[self._self_seq]) :])
        limit = min(max_tokens, self.config.copy_k or self.config.max_copy)
        match = self.index.lookup(tokens, limit) if limit > 0 else None
        if match is None:
            return []
        self._situation = AcceptanceEstimate.situation(match.match_len, self._streak)
        if self.config.copy_k is not None or self.cost is None:
            return list(match.continuation)
        k = self.cost.best_draft_len(self.memory.estimate.survival(self._situation), len(match.continuation))
        return list(match.continuation[:k])

    def observe(self, tokens: Sequence[int], drafted: int, accepted: int) -> None:
        self._answer[:] = tokens[self._prompt_len :]
        if drafted:
            self.memory.estimate.update(self._situation, drafted, accepted)
        self._streak = self._streak + 1 if drafted > 0 and accepted == drafted else 0


def build_index(
    tokenizer, references: Sequence[str], config: LLMAConfig, earlier_answers: Sequence[Sequence[int]] = ()
) -> ReferenceIndex:
    """Tokenize the references (and their variants) into an n-gram index, after the
    earlier answers (older entries rank below newer ones)."""
    index = ReferenceIndex(config.trigger_n, config.max_n)
    for answer in earlier_answers:
        if answer:
            index.add(answer)
    texts = [v for ref in references if ref for v in (reference_variants(ref) if config.variants else [ref])]
    if texts:
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            index.add(ids)
    return index


def llma_config(options) -> LLMAConfig:
    return method_config(LLMAConfig, options, "llma")


@register_method("llma", lossless=True)
def _llma(generator, prompt_ids, references, params):
    config = llma_config(params.options)
    memory = generator.method_state.setdefault("llma", LLMAMemory()) if config.memory else LLMAMemory()
    index = build_index(generator.tokenizer, references, config, memory.answers)
    cost = forward_cost(generator.model, generator.name) if config.copy_k is None else None
    return LLMADrafter(index, config, cost, memory), ExactMatch()
