"""Reciprocal rank fusion: one ranking out of several, by rank alone (Cormack et al., 2009).

Dense cosine scores and BM25 scores live on unrelated scales, so they are not added;
ranks are. A document's fused score is the sum over the rankings that hold it of
``weight / (rrf_k + rank)``, rank counted from 1. ``rrf_k = 60`` (the paper's) damps the
head: rank 1 scores 1/61, rank 2 1/62, so agreement between rankings counts for more than
one ranking's confidence.
"""

from __future__ import annotations

from typing import Sequence

RRF_K = 60  # the constant of Cormack, Clarke and Buettcher (SIGIR 2009)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]],
    k: int,
    rrf_k: int = RRF_K,
    weights: Sequence[float] | None = None,
) -> list[tuple[int, float]]:
    """Fuse ranked id lists (best first) into the top-k (id, score), best first.

    Worked example, rrf_k = 60, dense = [7, 3, 9], bm25 = [3, 5]::

        7: 1/61                 = 0.016393
        3: 1/62 + 1/61          = 0.032522   (second and first: agreement wins)
        9: 1/63                 = 0.015873
        5: 1/62                 = 0.016129
        -> [(3, 0.032522), (7, 0.016393), (5, 0.016129), (9, 0.015873)]

    Ties keep the order in which ids were first seen (earlier rankings first).

    Args:
        rankings: id lists, each best first; an id appears at most once per list.
        weights: one per ranking (default 1.0 each); 2.0 counts a ranking twice.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, doc_id in enumerate(ranking, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + weight / (rrf_k + rank)
    fused = sorted(scores.items(), key=lambda item: -item[1])  # stable: first seen wins ties
    return fused[:k]
