"""Prompts for answers over passages: the fixed system prompt, numbered passages, and the
fitting of passages and history into a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .types import Message, Source

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's question from the numbered passages "
    "given with it, in one or two complete sentences, and cite the passages you used like [1]. "
    "If the passages do not hold the answer, say so."
)
PLAIN_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly, in complete sentences."  # no store


class RequestError(ValueError):
    """A request the pipeline cannot answer; the message says what to change."""


def split_messages(messages: Sequence[Message]) -> tuple[str | None, list[dict], str]:
    """(the caller's system prompt or None, the history before the question, the question).

    Raises:
        RequestError: no messages, a last message that is not the user's, an empty question,
            or a message without role and content.
    """
    if not messages:
        raise RequestError("no messages: send at least one user message with the question")
    clean = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise RequestError(f"message {i} needs a role (system, user or assistant) and a text content")
        clean.append({"role": role, "content": content})
    system = None
    if clean[0]["role"] == "system":
        system = clean.pop(0)["content"]
    if not clean or clean[-1]["role"] != "user":
        raise RequestError("the last message must be the user's question")
    question = clean[-1]["content"].strip()
    if not question:
        raise RequestError("the question is empty: ask something")
    history = [m for m in clean[:-1] if m["role"] != "system"]
    return system, history, question


def retrieval_query(question: str, history: Sequence[Message], context_chars: int = 300) -> str:
    """The question with its context, for retrieval: the previous user turn and the start of
    the previous answer before it, so that "when was he born?" finds the passages about
    whoever the last turns were about."""
    previous_user = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
    previous_answer = next((m["content"] for m in reversed(history) if m["role"] == "assistant"), "")
    parts = [previous_user.strip(), previous_answer.strip()[:context_chars], question]
    return " ".join(p for p in parts if p)


def format_passages(sources: Sequence[Source]) -> str:
    return "\n".join(f"[{s.number}] {s.title}: {s.text}" if s.title else f"[{s.number}] {s.text}" for s in sources)


def user_message(question: str, sources: Sequence[Source]) -> str:
    if not sources:
        return question
    return f"Passages:\n{format_passages(sources)}\n\nQuestion: {question}"


def fit_sources(sources: Sequence[Source], budget: int, count_tokens: Callable[[str], int]) -> list[Source]:
    """The best-ranked passages whose formatted text fits in ``budget`` tokens (in rank
    order, a passage that does not fit is skipped, a later shorter one may still fit); the
    first passage is cut to the budget rather than left out."""
    kept: list[Source] = []
    used = 0
    for source in sources:
        cost = count_tokens(format_passages([source])) + 1
        if used + cost <= budget:
            kept.append(source)
            used += cost
        elif not kept:
            words = source.text.split()
            share = max(1, int(len(words) * budget / cost) - 8)
            kept.append(Source(source.number, source.id, source.title, " ".join(words[:share]), source.score))
            used = budget
    return [Source(i, s.id, s.title, s.text, s.score) for i, s in enumerate(kept, 1)]  # renumbered


# a history of at most this many characters per prompt token is templated whole first: it
# fits more often than not, and templating it is cheap (one call, as for a short chat)
_WHOLE_FIRST_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # the messages templated, as the engine's tokenizer counts them
    prefix_len: int  # leading tokens shared with the next request (system prompt, history)
    dropped_turns: int  # history messages left out to fit
    messages: tuple[dict, ...] = ()  # what was templated: system prompt, kept history, user message


def history_cuts(history: Sequence[Message]) -> list[int]:
    """Where the kept history may begin, oldest first: each cut drops one more turn (a user
    message and the answer after it, or a lone message), and the last keeps nothing.

    Example: roles [user, assistant, user, assistant, user] -> [0, 2, 4, 5].
    """
    cuts, start = [0], 0
    while start < len(history):
        start += 2 if start + 1 < len(history) and history[start + 1]["role"] == "assistant" else 1
        cuts.append(start)
    return cuts


def build_prompt(
    template: Callable[[list[dict]], list[int]],
    system: str,
    history: Sequence[Message],
    user_text: str,
    max_prompt_tokens: int,
) -> Prompt:
    """Template the chat, keeping the newest history turns that fit ``max_prompt_tokens``:
    the oldest turns are dropped, a whole turn at a time.

    The first cut that fits is searched from the newest end, galloping then bisecting, so
    that only the kept turns (and about as many more) are ever templated, a handful of
    times: a history of thousands of turns costs what its last screenful does. (Dropping
    one turn at a time from the oldest and templating everything again was quadratic.) A
    history short enough to be cheap is tried whole first, which is the common case.

    Example: a long history of 5 turn pairs, cuts [0, 2, 4, 6, 8, 10] (cut 10 keeps none).
    Cut 10 fits; galloping back, cut 8 (one turn) fits, cut 4 (two more) fits, cut 0 (four
    more, clamped) does not; bisecting between 0 and 4, cut 2 does not fit: the prompt keeps
    ``history[4:]`` and ``dropped_turns`` is 4.

    ``prefix_len`` is where the last user message's text begins: the system prompt and
    history before it recur in the next turn of the conversation, so their KV can be kept.

    Raises:
        RequestError: the question alone does not fit.
    """
    history = list(history)
    head = [{"role": "system", "content": system}]
    user = {"role": "user", "content": user_text}
    cuts = history_cuts(history)
    templated: dict[int, list[int]] = {}  # cut index -> prompt ids

    def fits(cut: int) -> bool:
        if cut not in templated:
            templated[cut] = template([*head, *history[cuts[cut] :], user])
        return len(templated[cut]) <= max_prompt_tokens

    newest = len(cuts) - 1  # the cut that keeps no history
    history_chars = sum(len(m["content"]) for m in history)
    if history_chars <= _WHOLE_FIRST_CHARS_PER_TOKEN * max_prompt_tokens and fits(0):
        kept = 0
    elif not fits(newest):
        raise RequestError(
            f"the question and its passages take {len(templated[newest])} tokens, over the prompt limit of "
            f"{max_prompt_tokens}: shorten the question"
        )
    else:
        # gallop back from the newest cut: ``kept`` fits, ``too_far`` (when found) does not
        kept, too_far, step = newest, -1, 1
        while kept > 0 and too_far < 0:
            probe = max(kept - step, 0)
            if fits(probe):
                kept, step = probe, step * 2
            else:
                too_far = probe
        while too_far >= 0 and kept - too_far > 1:  # bisect: the first cut that fits
            middle = (too_far + kept) // 2
            if fits(middle):
                kept = middle
            else:
                too_far = middle
    ids = templated[kept]
    head += history[cuts[kept] :]
    marker = template([*head, {"role": "user", "content": ""}])
    prefix_len = 0
    while prefix_len < min(len(ids), len(marker)) and ids[prefix_len] == marker[prefix_len]:
        prefix_len += 1
    return Prompt(ids, prefix_len, cuts[kept], (*head, user))
