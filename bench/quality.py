"""Output quality: ROUGE-L F (0..1) against a workload's targets and against the reference
method's output, with Google's rouge-score (the scorer of the BiLD and FREE papers)."""

from __future__ import annotations

import statistics
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, targets: Sequence[str]) -> float:
    """ROUGE-L F of ``prediction`` against the best-matching target.

    Example: rouge_l("the cat sat on the mat", ["a cat was sitting on the mat"]) -> 0.615:
    the longest common subsequence "cat on the mat" is 4 of the prediction's 6 tokens and
    4 of the target's 7, F = 2 * (4/6) * (4/7) / (4/6 + 4/7).
    """
    if not targets:
        raise ValueError("rouge_l needs at least one target")
    return max(_scorer().score(target, prediction)["rougeL"].fmeasure for target in targets)


def quality(texts: Sequence[str], targets: Sequence[Sequence[str]], reference_texts: Sequence[str]) -> dict:
    """Mean ROUGE-L against the targets (over prompts that have them; None where none do)
    and against the reference method's outputs, prompt by prompt."""
    scored = [rouge_l(text, t) for text, t in zip(texts, targets) if t]
    return {
        "rougeL": round(statistics.mean(scored), 4) if scored else None,
        "rougeL_prompts": len(scored),
        "rougeL_vs_reference_method": round(
            statistics.mean(rouge_l(text, [ref]) if ref or text else 1.0 for text, ref in zip(texts, reference_texts)), 4
        ),
    }
