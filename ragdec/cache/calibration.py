"""Calibration: the thresholds at which the cache serves, from labelled data.

Cosine scores mean different things under different embedders (E5 puts most questions
above 0.8, MiniLM spreads them from 0 to 1), so thresholds are measured, not guessed:

- ``calibrate_pairs`` reads question pairs labelled duplicate or not (Quora's hard
  non-duplicates are the test a cache must pass) and picks the lowest semantic threshold at
  which false hits (non-duplicates scored above it that also pass the guard) stay within the
  target, with 95% confidence; the near band starts where 90% of duplicates are above.
- ``calibrate_faq`` reads how paraphrases of curated questions score against them and picks
  the threshold and margin that answer most of them right with few wrong, again with 95%
  confidence.

Why a confidence bound: the lowest threshold whose *measured* rate is within the target
sits on the edge by construction, and the next sample of questions falls over it about
half the time. ``wilson_upper`` makes "within 1%" mean "within 1% unless we were unlucky".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ragdec.files import iter_jsonl

from .guard import paraphrase_guard
from .lookup import Policy

Z_95 = 1.645  # one-sided 95% normal quantile


@dataclass(frozen=True)
class Pair:
    a: str  # one question
    b: str  # the other
    duplicate: bool  # the label: same meaning, same answer


@dataclass(frozen=True)
class CurvePoint:
    threshold: float  # cosine
    hit_rate: float  # duplicates served: score >= threshold and the guard passes
    false_hit_rate: float  # non-duplicates served so
    hit_rate_unguarded: float  # duplicates with score >= threshold (no guard)
    false_hit_rate_unguarded: float  # non-duplicates with score >= threshold (no guard)


@dataclass(frozen=True)
class PairsCalibration:
    policy: Policy  # what is saved: semantic and near thresholds, the paraphrase guard
    target_false_hit_rate: float  # asked for
    false_hit_rate: float  # measured at the chosen threshold, on these pairs
    false_hit_upper: float  # its 95% upper bound (<= target)
    hit_rate: float  # duplicates served at the chosen threshold
    near_recall: float  # duplicates at or above the near threshold
    duplicates: int
    non_duplicates: int
    curve: tuple[CurvePoint, ...]  # the sweep behind the plot

    def report(self) -> dict:
        summary = asdict(self)
        summary.pop("curve")
        return summary


@dataclass(frozen=True)
class FaqCalibration:
    policy: Policy  # semantic threshold, margin and specifics guard for curated FAQ entries
    target_wrong_rate: float  # asked for
    right_rate: float  # queries served their own FAQ's answer
    wrong_rate: float  # queries served another FAQ's answer
    wrong_upper: float  # its 95% upper bound (<= target)
    queries: int  # paraphrases
    out_of_set_rate: float | None  # unrelated questions served an FAQ answer
    out_of_set_queries: int  # unrelated questions

    def report(self) -> dict:
        return asdict(self)


def read_pairs(path: str | Path) -> list[Pair]:
    """Question pairs from JSON Lines: ``{"a": ..., "b": ..., "duplicate": 0 or 1}``.

    Raises:
        FileNotFoundError: no file.
        ValueError: a line that is not such a record (its number is given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --pairs with a JSON Lines file of {{\"a\", \"b\", \"duplicate\"}} records")
    pairs = []
    for number, record in iter_jsonl(path):
        try:
            pairs.append(Pair(str(record["a"]), str(record["b"]), bool(int(record["duplicate"]))))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: expected {{\"a\": str, \"b\": str, \"duplicate\": 0|1}} ({error})") from error
    if not any(p.duplicate for p in pairs) or all(p.duplicate for p in pairs):
        raise ValueError(f"{path}: calibration needs both duplicate and non-duplicate pairs")
    return pairs


def embed_unique(embedder, texts: Sequence[str], progress: bool = False, batch: int = 256):
    """Question vectors of ``texts`` (each distinct text embedded once): float32 [n, d]."""
    import numpy as np

    unique = list(dict.fromkeys(texts))
    rows = {text: i for i, text in enumerate(unique)}
    starts = range(0, len(unique), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch")
    vectors = np.concatenate([embedder.embed_questions(unique[s : s + batch]) for s in starts]) if unique else None
    return vectors[[rows[t] for t in texts]]


def pair_vectors(embedder, pairs: Sequence[Pair], progress: bool = False):
    """Question vectors of each pair's two sides: (a [n, d], b [n, d])."""
    vectors = embed_unique(embedder, [p.a for p in pairs] + [p.b for p in pairs], progress)
    return vectors[: len(pairs)], vectors[len(pairs) :]


def guard_passes(pairs: Sequence[Pair]):
    """Whether the paraphrase guard lets each pair through: bool [n]."""
    import numpy as np

    return np.array([bool(paraphrase_guard(p.b, p.a)) for p in pairs])


def wilson_upper(errors: int, total: int, z: float = Z_95) -> float:
    """One-sided upper confidence bound of a rate seen as ``errors`` out of ``total``.

    Example: 8 false hits among 2000 pairs is 0.40% measured, 0.70% at most with 95%
    confidence; 19 of 2000 is 0.95% measured but 1.36% at most, which misses a 1% target.
    """
    if total == 0:
        return 1.0
    rate = errors / total
    centre = rate + z * z / (2 * total)
    spread = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total))
    return min(1.0, (centre + spread) / (1 + z * z / total))


def calibrate_pairs(
    scores, duplicate, guard_pass, target_false_hit_rate: float = 0.01, near_recall: float = 0.9, near_k: int = 3
) -> PairsCalibration:
    """Pick the semantic threshold and the near band from labelled pairs.

    Near: the score above which ``near_recall`` of the duplicates lie. Semantic: the lowest
    threshold t at which the non-duplicates that would be served (score >= t and the guard
    passes) are within ``target_false_hit_rate`` at 95% confidence, and not below the near
    threshold (a served match must at least score like most duplicates do).

    Example: 2000 non-duplicates; the guard lets 12 through, the lowest at cosine 0.41.
    All 12 served is 0.6% measured, 0.93% at 95%: within 1%, so no score is needed to keep
    false hits down, and t is the near threshold, say 0.73 (90% of duplicates above it).
    Had 25 passed the guard (1.25%), t would rise until few enough remain above it.
    """
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    duplicate = np.asarray(duplicate, dtype=bool)
    guard_pass = np.asarray(guard_pass, dtype=bool)
    n_dup, n_non = int(duplicate.sum()), int((~duplicate).sum())
    if n_dup == 0 or n_non == 0:
        raise ValueError("calibration needs both duplicate and non-duplicate pairs")
    # candidate thresholds: every score at which the served set changes, highest first
    served_non = np.sort(scores[guard_pass & ~duplicate])[::-1]
    threshold = float(scores.max()) + 1e-6  # serves nothing unless something lower is safe
    for count, score in enumerate(served_non, 1):
        if wilson_upper(count, n_non) > target_false_hit_rate:
            break
        threshold = float(score)
    else:  # every guarded non-duplicate together is within the target: no score limit needed
        threshold = float(scores.min())
    near = round(float(np.quantile(scores[duplicate], 1 - near_recall)), 4)
    # a semantic hit must also look like a typical duplicate: when the guard alone keeps
    # false hits within the target, the threshold would fall to the lowest score seen
    threshold = max(round(threshold, 4), near)
    false_hits = int((guard_pass & ~duplicate & (scores >= threshold)).sum())
    hits = int((guard_pass & duplicate & (scores >= threshold)).sum())
    return PairsCalibration(
        policy=Policy(semantic_threshold=threshold, near_threshold=near, guard="paraphrase", near_k=near_k),
        target_false_hit_rate=target_false_hit_rate,
        false_hit_rate=false_hits / n_non,
        false_hit_upper=wilson_upper(false_hits, n_non),
        hit_rate=hits / n_dup,
        near_recall=float((scores[duplicate] >= near).mean()),
        duplicates=n_dup,
        non_duplicates=n_non,
        curve=tuple(_curve(scores, duplicate, guard_pass)),
    )


def _curve(scores, duplicate, guard_pass, steps: int = 101):
    import numpy as np

    low = float(np.floor(scores.min() * 20) / 20)
    for t in np.linspace(low, 1.0, steps):
        above = scores >= t
        yield CurvePoint(
            threshold=round(float(t), 4),
            hit_rate=float((above & guard_pass)[duplicate].mean()),
            false_hit_rate=float((above & guard_pass)[~duplicate].mean()),
            hit_rate_unguarded=float(above[duplicate].mean()),
            false_hit_rate_unguarded=float(above[~duplicate].mean()),
        )


def calibrate_faq(
    top, margin, guard_pass, right, target_wrong_rate: float = 0.02, out_of_set=None,
    target_out_of_set_rate: float = 0.01, near_recall: float = 0.9, grid: int = 40,
) -> FaqCalibration:
    """Pick the semantic threshold and margin for a curated FAQ from paraphrase queries, and
    from questions that no FAQ entry answers.

    ``top`` [n]: each paraphrase's best score; ``margin`` [n]: over the best entry with
    another answer; ``guard_pass`` [n]: the specifics guard on the best entry; ``right``
    [n]: the best entry is the paraphrase's own FAQ. ``out_of_set``: (top, margin,
    guard_pass) of unrelated questions, every serve of which is wrong. Over a grid of
    thresholds and margins (quantiles of the paraphrases' scores), the policy with the most
    right answers wins among those whose wrong answers stay within ``target_wrong_rate`` and
    whose out-of-set serves stay within ``target_out_of_set_rate``, both at 95% confidence;
    ties go to the stricter policy. The near band starts where ``near_recall`` of the
    paraphrases that found their own FAQ first score above.

    Example, with the default targets (2% wrong, 1% out of set): 1000 paraphrases and 5000
    unrelated questions; a threshold t and margin m that serve 830 paraphrases right and 12
    wrong (1.2%, bound 1.91%) and 30 unrelated questions (0.6%, bound 0.81%) are allowed. A
    lower t with the same margin that serves 10 more right but 200 unrelated questions (4%)
    is not. (What the shipped policies serve: bench/results/cache.json, ``stackfaq``.)
    """
    import numpy as np

    top, margin = np.asarray(top, dtype=np.float64), np.asarray(margin, dtype=np.float64)
    guard_pass, right = np.asarray(guard_pass, dtype=bool), np.asarray(right, dtype=bool)
    n = len(top)
    if n == 0:
        raise ValueError("FAQ calibration needs paraphrase queries: give records with \"paraphrases\"")
    if out_of_set is not None:
        out_top, out_margin, out_guard = (np.asarray(x) for x in out_of_set)
    else:
        out_top, out_margin, out_guard = np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    best = (0, 0, round(float(top.max()) + 1e-4, 4), 0.0, 0)  # (right, -wrong, threshold, margin, out): serve nothing
    thresholds = np.unique(np.round(np.quantile(top, np.linspace(0, 1, grid + 1)), 4))
    positive = margin[margin > 0]
    margins = np.unique(np.round(np.concatenate([[0.0], np.quantile(positive, np.linspace(0, 0.95, grid)) if len(positive) else []]), 4))
    for t in thresholds:
        for m in margins:
            served = (top >= t) & (margin >= m) & guard_pass
            n_right, n_wrong = int((served & right).sum()), int((served & ~right).sum())
            n_out = int(((out_top >= t) & (out_margin >= m) & out_guard).sum())
            if wilson_upper(n_wrong, n) > target_wrong_rate:
                continue
            if len(out_top) and wilson_upper(n_out, len(out_top)) > target_out_of_set_rate:
                continue
            key = (n_right, -n_wrong, float(t), float(m), n_out)
            if key[:2] > best[:2] or (key[:2] == best[:2] and (key[2], key[3]) > (best[2], best[3])):
                best = key
    n_right, n_wrong, n_out = best[0], -best[1], best[4]
    threshold = round(best[2], 4)
    near = round(float(np.quantile(top[right], 1 - near_recall)), 4) if right.any() else threshold
    policy = Policy(semantic_threshold=threshold, near_threshold=min(near, threshold), margin=round(best[3], 4), guard="specifics")
    n_out_total = len(out_top)
    return FaqCalibration(
        policy, target_wrong_rate, n_right / n, n_wrong / n, wilson_upper(n_wrong, n), n,
        n_out / n_out_total if n_out_total else None, n_out_total,
    )


def plot_calibration(pairs: PairsCalibration, path: str | Path, title: str = "", faq_curve=None, faq_policy: Policy | None = None) -> Path:
    """Threshold against hit and false-hit rates (with and without the guard), the chosen
    threshold and the target marked; with ``faq_curve`` [(threshold, right, wrong)], a
    second panel for the FAQ (its chosen threshold marked when ``faq_policy`` is given).
    Written as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("matplotlib is not installed: pip install matplotlib==3.10.9") from error
    panels = 2 if faq_curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), squeeze=False)
    ax = axes[0][0]
    t = [p.threshold for p in pairs.curve]
    ax.plot(t, [p.hit_rate for p in pairs.curve], color="tab:blue", label="hit rate (duplicates), guarded")
    ax.plot(t, [p.false_hit_rate for p in pairs.curve], color="tab:red", label="false-hit rate (non-duplicates), guarded")
    ax.plot(t, [p.hit_rate_unguarded for p in pairs.curve], color="tab:blue", ls=":", label="hit rate, no guard")
    ax.plot(t, [p.false_hit_rate_unguarded for p in pairs.curve], color="tab:red", ls=":", label="false-hit rate, no guard")
    ax.axhline(pairs.target_false_hit_rate, color="grey", lw=0.8, ls="--", label=f"target {pairs.target_false_hit_rate:.0%}")
    ax.axvline(pairs.policy.semantic_threshold, color="black", lw=1, label=f"semantic >= {pairs.policy.semantic_threshold:.3f}")
    ax.axvspan(pairs.policy.near_threshold, pairs.policy.semantic_threshold, color="tab:green", alpha=0.08, label=f"near band from {pairs.policy.near_threshold:.3f}")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("share of pairs served")
    ax.set_title(f"question pairs ({pairs.duplicates} dup / {pairs.non_duplicates} non-dup)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left")
    if faq_curve:
        ax2 = axes[0][1]
        ft = [row[0] for row in faq_curve]
        ax2.plot(ft, [row[1] for row in faq_curve], color="tab:blue", label="right FAQ served")
        ax2.plot(ft, [row[2] for row in faq_curve], color="tab:red", label="wrong FAQ served")
        if faq_policy is not None:
            ax2.axvline(faq_policy.semantic_threshold, color="black", lw=1, label=f"semantic >= {faq_policy.semantic_threshold:.3f}, margin {faq_policy.margin:.3f}")
        ax2.set_xlabel("cosine threshold (calibrated margin and guard applied)")
        ax2.set_ylabel("share of paraphrase queries")
        ax2.set_title("FAQ paraphrases")
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def faq_curve(top, margin, guard_pass, right, policy: Policy, steps: int = 61):
    """(threshold, right share, wrong share) over thresholds at ``policy``'s margin."""
    import numpy as np

    top, margin = np.asarray(top), np.asarray(margin)
    guard_pass, right = np.asarray(guard_pass, dtype=bool), np.asarray(right, dtype=bool)
    low = float(np.floor(top.min() * 20) / 20)
    rows = []
    for t in np.linspace(low, 1.0, steps):
        served = (top >= t) & (margin >= policy.margin) & guard_pass
        rows.append((float(t), float((served & right).mean()), float((served & ~right).mean())))
    return rows
