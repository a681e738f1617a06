"""The exact-hit key: a question normalized so that trivial variants share one hash.

Only what cannot change the meaning is normalized away: Unicode forms, case, runs of
whitespace, curly quotes, and the punctuation that ends a question. Inner punctuation stays
("C++" is not "C", "3.5" is not "35"); anything more is left to the semantic path, where the
guard can say no.
"""

from __future__ import annotations

import hashlib
import unicodedata

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
# what ends a question and is stripped from its end: ASCII and CJK question marks and full
# stops, and the one space left between words. ``str.rstrip``, not a regex: ``[...]+$``
# searched from every position is quadratic on a long run of "?" followed by a letter
_TRAILING = " ?!.\u3002\uff1f\uff01"


def normalize_question(question: str) -> str:
    """The question as compared for exact hits.

    Example: ``normalize_question("  What is  the capital of France?? ")`` ->
    ``"what is the capital of france"``; ``normalize_question("What is C++?")`` ->
    ``"what is c++"`` (the pluses stay, so it never equals "what is c").
    """
    text = unicodedata.normalize("NFKC", question).translate(_QUOTES).casefold()
    text = " ".join(text.split())  # the only whitespace left is single spaces
    return text.rstrip(_TRAILING)


def question_hash(question: str) -> str:
    """SHA-256 (hex) of the normalized question: the exact-hit key."""
    return hashlib.sha256(normalize_question(question).encode("utf-8")).hexdigest()


def answer_hash(answer: str) -> str:
    """SHA-256 (hex) of the answer with whitespace runs made one space; tells apart matches
    that would serve different answers (a paraphrase of the same FAQ is not a competitor)."""
    return hashlib.sha256(" ".join(answer.split()).encode("utf-8")).hexdigest()
