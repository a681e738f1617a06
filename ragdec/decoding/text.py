"""Token ids to streamed text: whole characters only, stop strings held back."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Text is held back while it ends in an incomplete UTF-8 character (the tokenizer
    decodes it as U+FFFD) or in what could be the start of a stop string, so that
    a client never sees text that is later taken back.

    Example: stop=("\\n\\n",). Tokens decode to "Paris.", then "Paris.\\n": "Paris." was
    sent and "\\n" is held; then "Paris.\\n\\nThe": the stop string completes, nothing
    more is sent and ``text`` is "Paris.".
    """

    def __init__(self, decode, stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._sent = 0  # characters already returned
        self.text = ""  # the answer so far, cut at a stop string

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the text that can now be shown."""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        stopped = False
        for s in self._stop:
            at = text.find(s)
            if at != -1:
                text, stopped = text[:at], True
        self.text = text
        ready = len(text)
        if not (final or stopped):
            if text.endswith("\ufffd"):
                ready -= 1
            ready -= self._held_for_stop(text)
        delta = text[self._sent : max(ready, self._sent)]
        self._sent += len(delta)
        return delta

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
