"""A conversation kept between questions, over any pipeline: what `ragdec chat` and the
web chat hold for their user."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from ragdec.decoding.methods import GenerationParams

from .limits import MAX_MESSAGES, MAX_REQUEST_CHARS, newest_turns
from .types import AUTO, AnswerInfo, Chunk, Pipeline, Request


class ChatSession:
    """Multi-turn chat: each question is sent with the turns before it.

    Example::

        chat = ChatSession(pipeline)
        "".join(c.text for c in chat.ask("Who wrote Hamlet?"))
        "".join(c.text for c in chat.ask("When was he born?"))   # retrieval sees both turns
        chat.last_info.sources; chat.reset()
    """

    def __init__(self, pipeline: Pipeline, params: GenerationParams | None = None, system: str | None = None):
        self.pipeline = pipeline
        self.params = params or GenerationParams(max_new_tokens=256, method=AUTO)
        self.system = system  # None: the pipeline's own system prompt
        self.messages: list[dict] = []
        self.last_info: AnswerInfo | None = None

    def reset(self) -> None:
        self.messages.clear()
        self.last_info = None

    def ask(self, question: str, **params) -> Iterator[Chunk]:
        """Stream the answer to ``question``; the turn joins the history when it ends well."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        question_message = {"role": "user", "content": question}
        # a long conversation sends its newest turns within the request limits
        room = MAX_REQUEST_CHARS - sum(len(m["content"]) for m in (*head, question_message))
        history = newest_turns(self.messages, MAX_MESSAGES - len(head) - 1, room)
        messages = [*head, *history, question_message]
        request = Request(messages, params=replace(self.params, **params))
        texts = []
        for chunk in self.pipeline.stream([request]):
            texts.append(chunk.text)
            if chunk.finish_reason is not None:
                self.last_info = chunk.info
                if chunk.finish_reason != "error":
                    self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(texts).strip()}]
            yield chunk
