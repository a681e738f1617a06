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

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

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
    queries: int

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
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append(Pair(str(record["a"]), str(record["b"]), bool(int(record["duplicate"]))))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: expected {{\"a\": str, \"b\": str, \"duplicate\": 0|1}} ({error})") from error
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


def pair_scores(embedder, pairs: Sequence[Pair], progress: bool = False):
    """Cosine of each pair under ``embedder``'s question embeddings: float [n]."""
    vectors = embed_unique(embedder, [p.a for p in pairs] + [p.b for p in pairs], progress)
    return (vectors[: len(pairs)] * vectors[len(pairs) :]).sum(axis=1)


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

    Semantic: the lowest threshold t at which the non-duplicates that would be served
    (score >= t and guard passes) are within ``target_false_hit_rate`` at 95% confidence;
    lower thresholds serve more duplicates, so the lowest safe one serves the most.
    Near: the score above which ``near_recall`` of the duplicates lie.

    Example: 2000 non-duplicates of which 12 pass the guard, 6 of those at cosine >= 0.62:
    at t = 0.62, 6/2000 = 0.3% measured, 0.58% bound: within 1%, so t can go lower until
    the bound reaches 1%; if all 12 together stay within it, t is the lowest score seen.
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
    near = float(np.quantile(scores[duplicate], 1 - near_recall))
    threshold = round(threshold, 4)  # 4 digits: what the policy keeps and the plot shows
    near = round(min(near, threshold), 4)
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
    top, margin, guard_pass, right, near_threshold: float, target_wrong_rate: float = 0.02, grid: int = 40
) -> FaqCalibration:
    """Pick the semantic threshold and margin for a curated FAQ from paraphrase queries.

    ``top`` [n]: each query's best score; ``margin`` [n]: over the best entry with another
    answer; ``guard_pass`` [n]: the specifics guard on the best entry; ``right`` [n]: the
    best entry holds the query's own answer. Over a grid of thresholds and margins (score
    quantiles), the policy with the most right answers whose wrong ones stay within
    ``target_wrong_rate`` at 95% confidence wins; ties go to the stricter policy.

    Example: 600 queries; t = 0.45, m = 0.08 serves 470 right and 3 wrong (0.5%, bound
    1.1%): allowed; t = 0.40, m = 0.05 serves 500 right and 9 wrong (1.5%, bound 2.5%): not.
    """
    import numpy as np

    top, margin = np.asarray(top, dtype=np.float64), np.asarray(margin, dtype=np.float64)
    guard_pass, right = np.asarray(guard_pass, dtype=bool), np.asarray(right, dtype=bool)
    n = len(top)
    if n == 0:
        raise ValueError("FAQ calibration needs paraphrase queries: give records with \"paraphrases\"")
    best = (0, 0, float(top.max()) + 1e-6, 0.0)  # (right, -wrong, threshold, margin): serve nothing
    thresholds = np.unique(np.round(np.quantile(top, np.linspace(0, 1, grid + 1)), 4))
    margins = np.unique(np.round(np.concatenate([[0.0], np.quantile(margin[margin > 0], np.linspace(0, 0.95, grid))]) if (margin > 0).any() else [0.0], 4))
    for t in thresholds:
        for m in margins:
            served = (top >= t) & (margin >= m) & guard_pass
            n_right, n_wrong = int((served & right).sum()), int((served & ~right).sum())
            if wilson_upper(n_wrong, n) > target_wrong_rate:
                continue
            key = (n_right, -n_wrong, float(t), float(m))
            if key[:2] > best[:2] or (key[:2] == best[:2] and (key[2], key[3]) > (best[2], best[3])):
                best = key
    n_right, n_wrong = best[0], -best[1]
    policy = Policy(semantic_threshold=round(best[2], 4), near_threshold=min(near_threshold, round(best[2], 4)), margin=round(best[3], 4), guard="specifics")
    return FaqCalibration(policy, target_wrong_rate, n_right / n, n_wrong / n, wilson_upper(n_wrong, n), n)


def plot_calibration(pairs: PairsCalibration, path: str | Path, title: str = "", faq_curve=None) -> Path:
    """Threshold against hit and false-hit rates (with and without the guard), the chosen
    threshold and the target marked; with ``faq_curve`` [(threshold, right, wrong)], a
    second panel for the FAQ. Written as PNG."""
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
    ax.legend(fontsize=7, loc="upper right")
    if faq_curve:
        ax2 = axes[0][1]
        ft = [row[0] for row in faq_curve]
        ax2.plot(ft, [row[1] for row in faq_curve], color="tab:blue", label="right FAQ served")
        ax2.plot(ft, [row[2] for row in faq_curve], color="tab:red", label="wrong FAQ served")
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
