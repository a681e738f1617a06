"""An n-gram index over token sequences: where does the text just decoded occur in the
references, and what follows it there?

Each n-gram (trigger_n <= n <= max_n) that has at least one token after it maps to the
places it ends, so a lookup is a few dict probes whatever the size of the references,
and a sequence that grows (the answer being decoded) is indexed incrementally.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

MAX_CANDIDATES = 64  # most recent places considered per n-gram; common n-grams recur a lot


@dataclass(frozen=True)
class Match:
    match_len: int  # n: how many trailing tokens matched
    continuation: tuple[int, ...]  # tokens that follow the match in the reference
    sequence: int  # which indexed sequence it came from
    occurrences: int  # how many places share this n-gram


class ReferenceIndex:
    """n-gram -> (sequence, position after the n-gram), for any number of sequences.

    Example (trigger_n=1, max_n=2): index [7, 8, 9, 7, 8, 5]. The context [.., 7, 8]
    matches the 2-gram (7, 8) at two places, followed by 9 (older) and 5 (newer); both
    continuations are seen once, so the newer wins: ``lookup(ctx, 3)`` returns
    Match(match_len=2, continuation=(5,), ...) -- only one token follows it. The context
    [.., 3, 9] matches no 2-gram, but the 1-gram (9,) is followed by (7, 8, 5).
    """

    def __init__(self, trigger_n: int = 2, max_n: int = 6):
        if not 1 <= trigger_n <= max_n:
            raise ValueError(f"need 1 <= trigger_n <= max_n, got trigger_n={trigger_n}, max_n={max_n}")
        self.trigger_n = trigger_n
        self.max_n = max_n
        self.sequences: list[list[int]] = []
        self._indexed: list[int] = []  # per sequence: positions whose n-grams are indexed
        self._table: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def add(self, token_ids: Sequence[int]) -> int:
        """Index a new sequence; return its id (later ids count as more recent)."""
        self.sequences.append([])
        self._indexed.append(0)
        seq_id = len(self.sequences) - 1
        self.extend(seq_id, token_ids)
        return seq_id

    def extend(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Append tokens to a sequence and index the n-grams that now have a continuation."""
        seq = self.sequences[seq_id]
        seq.extend(token_ids)
        # an n-gram ending at position end - 1 is indexed once token ``end`` exists
        for end in range(max(self._indexed[seq_id], 1), len(seq)):
            for n in range(self.trigger_n, min(self.max_n, end) + 1):
                self._table.setdefault(tuple(seq[end - n : end]), []).append((seq_id, end))
        self._indexed[seq_id] = max(self._indexed[seq_id], len(seq))

    def lookup(self, context: Sequence[int], copy_k: int) -> Match | None:
        """The longest n-gram match of the end of ``context``, and up to ``copy_k`` tokens
        that follow it. Among places with the same n-gram, the continuation whose next
        token is seen most often wins, then the most recent place."""
        for n in range(min(self.max_n, len(context)), self.trigger_n - 1, -1):
            places = self._table.get(tuple(context[-n:]))
            if not places:
                continue
            recent = places[-MAX_CANDIDATES:]
            counts = Counter(self.sequences[s][p] for s, p in recent)
            most = max(counts.values())
            for s, p in reversed(recent):  # newest first: breaks ties by recency
                if counts[self.sequences[s][p]] == most:
                    continuation = tuple(self.sequences[s][p : p + copy_k])
                    return Match(n, continuation, s, len(places))
        return None
