"""Limits on what one request may carry, so that no request costs minutes before its
first token.

Every message and reference of a request is tokenized and indexed for copying (LLMA's
n-gram index, in Python) before decoding starts, history turns included even when the
prompt leaves them out; every stop string is searched in the answer at every step. The
limits sit far above any real conversation or document and still bound that work to
seconds. A request over one ends with ``finish_reason="error"`` and a message saying what
to change.
"""

from __future__ import annotations

from typing import Sequence

from .prompts import RequestError, history_cuts
from .types import Message, Request

# 500 turn pairs: the default prompt (3,072 tokens) shows the last few dozen, so a longer
# conversation is better trimmed by the client than sent whole to be indexed
MAX_MESSAGES = 1_000
# texts given to copy from: each is a sequence of its own in the copy index; a caller with
# more joins them (the pipeline's own passages and near-hit answers do not count)
MAX_REFERENCES = 1_000
# messages and references together: about 50k tokens, 16 times the default prompt, a long
# document's worth; indexing it for copying takes seconds on two cores
MAX_REQUEST_CHARS = 200_000
# OpenAI's API allows 4; each is searched in the whole answer at every decoding step
MAX_STOP_STRINGS = 16
# a stop string's prefixes are tried against the answer's end at every step (quadratic in
# its length); real stop strings ("\n\n", "Question:", "</answer>") are a few characters
MAX_STOP_CHARS = 100


def check_limits(request: Request) -> None:
    """Refuse a request over a limit of this module.

    Example: 1,500 messages -> ``RequestError("the request has 1,500 messages, over the
    limit of 1,000: send the last turns of the conversation, the prompt keeps only those")``.

    Raises:
        RequestError: naming the limit, the request's figure and what to change.
    """
    messages, references, stop = request.messages, request.references, request.params.stop
    if len(messages) > MAX_MESSAGES:
        raise RequestError(
            f"the request has {len(messages):,} messages, over the limit of {MAX_MESSAGES:,}: send the last "
            "turns of the conversation, the prompt keeps only those"
        )
    if len(references) > MAX_REFERENCES:
        raise RequestError(
            f"the request has {len(references):,} references, over the limit of {MAX_REFERENCES:,}: join short "
            "ones into one text"
        )
    texts = [m.get("content") for m in messages] + list(references)
    chars = sum(len(text) for text in texts if isinstance(text, str))
    if chars > MAX_REQUEST_CHARS:
        raise RequestError(
            f"the messages and references hold {chars:,} characters, over the limit of {MAX_REQUEST_CHARS:,}: "
            "send the passages that matter (or index long documents with `ragdec index build` and let "
            "retrieval pick them)"
        )
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"{len(stop)} stop strings, over the limit of {MAX_STOP_STRINGS}: keep the ones that end answers")
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise RequestError(f"a stop string of {longest:,} characters, over the limit of {MAX_STOP_CHARS}: shorten it")


def newest_turns(history: Sequence[Message], messages: int, chars: int) -> list[Message]:
    """The newest whole turns of ``history`` that fit in ``messages`` messages and ``chars``
    characters: what a client keeping a long conversation sends (the prompt would drop the
    older turns anyway, oldest first, by the same turns).

    Example: 3 turn pairs of 10-character messages, ``messages=5``, ``chars=1000`` -> the
    last 2 pairs (4 messages; the third pair would make 6).
    """
    cuts = history_cuts(history)
    kept, used = len(history), 0
    for start, end in zip(reversed(cuts[:-1]), reversed(cuts[1:])):  # turns, newest first
        used += sum(len(m["content"]) for m in history[start:end])
        if len(history) - start > messages or used > chars:
            break
        kept = start
    return list(history[kept:])
