"""BM25 as sparse vectors, for stores whose keyword search runs in Qdrant.

Qdrant scores a sparse query ``q`` against a point's sparse vector ``d`` as
``sum_t q_t * d_t``, and a collection made with ``Modifier.IDF`` multiplies each term by
``idf(t) = ln((N - n_t + 0.5) / (n_t + 0.5) + 1)`` over its live points. So a passage's
vector carries BM25's term-frequency part and a question's vector a 1 for each of its terms,
and the score Qdrant returns is BM25::

    score(q, D) = sum over t in q of idf(t) * tf(t, D) * (k1 + 1) / (tf(t, D) + k1 * (1 - b + b * |D| / avgdl))

Terms are cut by SQLite's own FTS5 tokenizer (``store.FTS_TOKENIZER``), the one a FAISS
store's ``passages_fts`` uses, over title and text together (FTS5 counts a passage's
tokens in both columns as one document); a question is cut to ``store.query_words`` first,
stopwords dropped, as for FTS5. Two things differ from FTS5's ``bm25()``: FTS5's idf has no
``+ 1`` (it floors a term in most passages near zero where this one keeps it small but
positive), and ``avgdl`` is fixed when the collection is built (the manifest records it)
where FTS5 reads the current average; a store whose passages grow much longer or shorter
than at its build is best rebuilt.

A term's index in a vector is a 32-bit hash of the term, so no vocabulary is kept anywhere
and every replica computes the same query vector.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import Counter
from typing import Sequence

from .store import FTS_TOKENIZER, query_words

K1 = 1.2  # term-frequency saturation: FTS5 bm25()'s value, so both backends weigh terms alike
B = 0.75  # length normalisation: FTS5 bm25()'s value


class FtsTokenizer:
    """SQLite FTS5's tokenizer, as a function from texts to term counts; thread-safe.

    The texts go into an in-memory FTS5 table inside a transaction that is rolled back, and
    its ``fts5vocab`` view says which terms each one holds.
    """

    def __init__(self) -> None:
        # autocommit mode, so that BEGIN and ROLLBACK below are the only transaction
        self._conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._conn.executescript(
            f"CREATE VIRTUAL TABLE body USING fts5(text, tokenize='{FTS_TOKENIZER}');"
            "CREATE VIRTUAL TABLE terms USING fts5vocab(body, 'instance');"
        )
        self._lock = threading.Lock()

    def term_counts(self, texts: Sequence[str]) -> list[Counter]:
        """The terms of each text and how often each occurs.

        Example: ``term_counts(["Rhine\\nThe Rhine begins in the Alps."])`` ->
        ``[Counter({"rhine": 2, "the": 2, "begin": 1, "in": 1, "alp": 1})]``
        (lower case, accents dropped, Porter stems).
        """
        counts = [Counter() for _ in texts]
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT INTO body (rowid, text) VALUES (?, ?)", enumerate(texts, start=1))
                for row, term, occurrences in self._conn.execute(
                    "SELECT doc, term, count(*) FROM terms GROUP BY doc, term"
                ):
                    counts[row - 1][term] = occurrences
            finally:
                self._conn.execute("ROLLBACK")
        return counts


TOKENIZER = FtsTokenizer()


def term_id(term: str) -> int:
    """A term's index in the sparse vectors: the first 4 bytes of its BLAKE2b hash.

    Two terms share an index about once in 4 billion pairs; a collision merges their
    weights, which shifts a few BM25 scores and breaks nothing.
    """
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=4).digest(), "little")


def passage_terms(titles: Sequence[str], texts: Sequence[str]) -> list[Counter]:
    """Term counts of passages, title and text together as FTS5 indexes them."""
    return TOKENIZER.term_counts([f"{title}\n{text}" if title else text for title, text in zip(titles, texts)])


def average_length(term_counts: Sequence[Counter]) -> float | None:
    """Mean tokens per passage: BM25's ``avgdl``; None for no passages."""
    if not term_counts:
        return None
    return sum(sum(counts.values()) for counts in term_counts) / len(term_counts)


def passage_vector(counts: Counter, avgdl: float) -> tuple[list[int], list[float]]:
    """A passage's sparse vector: (term ids ascending, BM25 term-frequency weights).

    Worked example, "Rhine" / "The Rhine begins in the Alps." (7 tokens) in a corpus whose
    passages average 7 tokens: the length factor is ``k1 * (1 - b + b * 7 / 7) = 1.2``, so

        rhine, the (tf 2):        2 * 2.2 / (2 + 1.2) = 1.375
        begin, in, alp (tf 1):    1 * 2.2 / (1 + 1.2) = 1.0

    The same passage in a corpus averaging 14 tokens is short for it: the factor is
    ``1.2 * (0.25 + 0.75 * 0.5) = 0.75`` and a word seen once weighs 2.2 / 1.75 = 1.257.
    """
    length = sum(counts.values())
    length_factor = K1 * (1 - B + B * length / avgdl)
    weights: dict[int, float] = {}
    for term, tf in counts.items():
        index = term_id(term)  # a collision adds the two terms' weights
        weights[index] = weights.get(index, 0.0) + tf * (K1 + 1) / (tf + length_factor)
    indices = sorted(weights)
    return indices, [weights[i] for i in indices]


def query_vector(question: str) -> tuple[list[int], list[float]]:
    """A question's sparse vector: a 1 for each distinct term of its ``query_words``.

    Example: ``query_vector("Where does the Rhine begin?")`` holds the ids of "rhine" and
    "begin" ("where", "does", "the" are stopwords), each with weight 1.0; Qdrant then sums
    idf * weight over the passages holding them. ([], []) when no word is left.
    """
    words = query_words(question)
    if not words:
        return [], []
    indices = sorted({term_id(term) for term in TOKENIZER.term_counts([" ".join(words)])[0]})
    return indices, [1.0] * len(indices)
