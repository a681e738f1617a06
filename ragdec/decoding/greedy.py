"""Plain greedy decoding on the seam: no draft, exact-match acceptance.

``ExactMatch`` is also the lossless acceptance rule of LLMA and of the lossless modes
of BiLD and FREE: it keeps a draft token only where it equals the target's argmax, so
the output is the target's greedy output whatever the drafter proposed.
"""

from __future__ import annotations

from typing import Sequence

from .seam import Drafter


class NoDraft(Drafter):
    """The drafter of plain greedy decoding: it never proposes."""

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        return []


class ExactMatch:
    """Keep the longest draft prefix equal to the target's argmax, plus the next argmax.

    Example: draft [5, 9, 4]; target argmax at [last, 5, 9, 4] is [5, 9, 7, 2]:
    5 == 5, 9 == 9, 4 != 7, so accept [5, 9] and the target's own 7 -> [5, 9, 7].
    With an empty draft this is one greedy step: [argmax].
    """

    def accept(self, draft: Sequence[int], logits) -> list[int]:
        predicted = logits.argmax(dim=-1).tolist()  # [k + 1]
        accepted_len = 0
        while accepted_len < len(draft) and draft[accepted_len] == predicted[accepted_len]:
            accepted_len += 1
        return [*draft[:accepted_len], predicted[accepted_len]]
