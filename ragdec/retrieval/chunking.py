"""Cut documents into passages the embedder reads whole: windows of tokens with overlap.

Passages are measured in the embedder's own tokens (a word may be one token or four), so a
passage never runs past what the model reads and nothing is silently truncated. Each
passage is an exact slice of the document's text, never re-joined tokens, so that a
decoder copying from it copies the original characters.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

_MAX_WORD_BACKOFF = 16  # tokens a cut may move back to avoid splitting a word


@dataclass(frozen=True)
class Chunk:
    text: str  # document[start:end], stripped of surrounding whitespace
    position: int  # 0, 1, 2, ... within the document
    start: int  # character offset in the document
    end: int  # character offset in the document (exclusive)


_UNTRUNCATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _untruncated_backend(tokenizer):
    """A copy of the fast tokenizer's backend that neither truncates nor pads: some
    tokenizer.json files carry a truncation (all-MiniLM-L6-v2's: 128 tokens) that would cut
    every document short."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if tokenizer not in _UNTRUNCATED:
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        _UNTRUNCATED[tokenizer] = copy
    return _UNTRUNCATED[tokenizer]


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the tokens of ``text``, special tokens left out."""
    backend = _untruncated_backend(tokenizer)
    if backend is not None:  # fast path, and no "longer than the model's maximum" warning
        encoding = backend.encode(text, add_special_tokens=False)
        return [span for span in encoding.offsets if span[1] > span[0]]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [tuple(span) for span in encoded["offset_mapping"] if span[1] > span[0]]


def _starts_word(text: str, offsets: list[tuple[int, int]], i: int) -> bool:
    """Whether token i begins a word: first token, or whitespace before it."""
    return i == 0 or offsets[i][0] > offsets[i - 1][1] or text[offsets[i][0] - 1].isspace()


def _word_start_at_or_before(text: str, offsets: list[tuple[int, int]], i: int, floor: int) -> int:
    """The nearest word start in [max(floor, i - 16), i], else i (a word longer than that
    many tokens is cut where it stands)."""
    for j in range(i, max(floor, i - _MAX_WORD_BACKOFF) - 1, -1):
        if _starts_word(text, offsets, j):
            return j
    return i


def _word_start_near(text: str, offsets: list[tuple[int, int]], i: int, low: int, high: int) -> int:
    """The nearest word start to token i, looking back to ``low`` first, then on to ``high``."""
    j = _word_start_at_or_before(text, offsets, i, low)
    if _starts_word(text, offsets, j):
        return j
    for j in range(i + 1, min(high, i + _MAX_WORD_BACKOFF)):
        if _starts_word(text, offsets, j):
            return j
    return i


def chunk_text(text: str, tokenizer, chunk_tokens: int = 256, overlap_tokens: int = 32) -> list[Chunk]:
    """Split ``text`` into windows of at most ``chunk_tokens`` tokens; each window starts
    ``chunk_tokens - overlap_tokens`` tokens after the previous one, so a sentence cut at
    the end of one passage is read whole at the start of the next. Cuts fall between words.

    Worked example, with one token per word, ``chunk_tokens=4``, ``overlap_tokens=1``::

        "a b c d e f g h i j"  (10 tokens; step = 4 - 1 = 3)
        windows start at tokens 0, 3, 6: tokens 0-3, 3-6, 6-9
        -> "a b c d", "d e f g", "g h i j"

    The last window ends at the last token; no window is added that the previous one
    already covers. A text of at most ``chunk_tokens`` tokens is one chunk; a blank text
    is none.

    Args:
        tokenizer: the embedder's (``Embedder.tokenizer``).
        chunk_tokens: passage length in tokens, prefix and special tokens not counted.
        overlap_tokens: tokens shared by consecutive passages; less than ``chunk_tokens``.
    """
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(
            f"overlap_tokens ({overlap_tokens}) must be at least 0 and less than chunk_tokens ({chunk_tokens})"
        )
    offsets = token_offsets(tokenizer, text)
    if not offsets:
        return []
    chunks: list[Chunk] = []
    start = 0
    while True:
        end = min(start + chunk_tokens, len(offsets))  # token index, exclusive
        if end < len(offsets):  # cut before the word that token ``end`` is part of
            end = _word_start_at_or_before(text, offsets, end, start + 1)
        begin_char, end_char = offsets[start][0], offsets[end - 1][1]
        piece = text[begin_char:end_char]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            chunks.append(Chunk(stripped, len(chunks), begin_char + lead, begin_char + lead + len(stripped)))
        if end >= len(offsets):
            return chunks
        start = _word_start_near(text, offsets, max(start + 1, end - overlap_tokens), start + 1, end)
