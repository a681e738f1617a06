"""How fast any copying drafter could decode an answer: an upper bound for LLMA.

Given the answer's tokens, the texts a drafter may copy from (the references and the answer
so far) and the machine's cost curve (``cost.ForwardCost``: ``seconds[k]`` for a forward of
the last token and k drafted ones), an oracle that knows which copies will stand drafts,
at each position, exactly a span that the answer takes next and that occurs in a
reference, of the length that makes the whole answer fastest (dynamic programming over
positions). No drafter that copies from those texts and verifies losslessly can beat it:
a real one must find the span from the tokens before it, cannot know where a copy stops,
and pays for rejected drafts. ``after_last=True`` gives the tighter bound of a drafter that
looks copies up as LLMA does: a span counts only where it follows an occurrence of the
token before it (a one-token match), the oracle still choosing the right occurrence.

The ratio against greedy, for the decode phase (the first token comes with the prompt):
``(n - 1) * (seconds[0] + overhead) / T``, where T is the oracle's time and ``overhead``
what the loop adds to each forward (the same for both).

Example: answer ``[5, 6, 7, 8, 9]``, one reference ``[6, 7, 8, 9]``, seconds ``(1.0, 1.2,
1.4, 1.6, 1.8)``, no overhead: after the first token, one forward drafts ``[6, 7, 8]``
(the last token, 9, is the forward's own) in 1.6 against greedy's 4 steps of 1.0: 2.5x.
"""

from __future__ import annotations

from typing import Sequence


def longest_copy(answer: Sequence[int], i: int, sources: Sequence[Sequence[int]], after_last: bool = False) -> int:
    """The longest run of ``answer`` from position ``i`` that occurs in one of ``sources``
    or in the answer before ``i`` (``after_last``: right after an occurrence of
    ``answer[i - 1]``)."""
    best = 0
    for source in (*sources, answer[:i]):
        for j in range(len(source)):
            if after_last and (j == 0 or source[j - 1] != answer[i - 1]):
                continue
            length = 0
            while i + length < len(answer) and j + length < len(source) and source[j + length] == answer[i + length]:
                length += 1
            best = max(best, length)
    return best


def copy_speedup_bound(
    answer: Sequence[int], sources: Sequence[Sequence[int]], seconds: Sequence[float], overhead: float = 0.0, after_last: bool = False,
) -> float | None:
    """The oracle's decode speedup over greedy (see the module docstring); None for an
    answer of fewer than 2 tokens (no decode phase)."""
    n = len(answer)
    if n < 2:
        return None
    max_draft = len(seconds) - 1
    fastest = [0.0] * (n + 1)  # fastest[i]: the oracle's time from position i to the end
    for i in range(n - 1, 0, -1):
        copyable = min(longest_copy(answer, i, sources, after_last), max_draft, n - i - 1)
        fastest[i] = min(seconds[k] + overhead + fastest[i + k + 1] for k in range(copyable + 1))
    return (n - 1) * (seconds[0] + overhead) / fastest[1]
