"""When to stop: end-of-sequence ids, stop strings, a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StopCondition:
    eos_token_ids: frozenset[int]  # any of these ends the answer (it is kept in token_ids)
    stop_strings: tuple[str, ...] = ()  # the answer ends at the token completing one of these
    max_new_tokens: int = 128

    def first_stop(self, generated: Sequence[int], start: int, decode) -> tuple[int, str] | None:
        """Find where generation ends among ``generated[start:]``.

        Returns ``(n, reason)``: keep ``generated[:n]``, finish with ``reason``; None
        to go on. ``decode`` turns token ids into text (only used with stop strings).

        Example: stop_strings=("\\n\\n",), generated text "Paris.|\\n|\\n|The" by token,
        start=1: the token after "Paris." gives "\\n", the next completes "\\n\\n", so
        ``(3, "stop")``: "Paris.\\n\\n" stays as tokens, the text is cut at the stop string.
        """
        for i in range(start, len(generated)):
            if generated[i] in self.eos_token_ids:
                return i + 1, "stop"
            if self.stop_strings and self._ends_in_stop(generated, i, decode):
                return i + 1, "stop"
            if i + 1 >= self.max_new_tokens:
                return i + 1, "length"
        return None

    def _ends_in_stop(self, generated: Sequence[int], i: int, decode) -> bool:
        # Earlier tokens were checked before, so a stop string in the text up to token i
        # was completed by token i. Decoding the whole answer (not a tail) keeps
        # multi-byte and merged tokens exact; it costs microseconds against a forward.
        text = decode(generated[: i + 1])
        return any(s in text for s in self.stop_strings)

    def cut_text(self, text: str) -> str:
        """The answer's text without the stop string and what follows it."""
        cut = len(text)
        for s in self.stop_strings:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
        return text[:cut]
