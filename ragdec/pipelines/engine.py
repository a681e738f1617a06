"""The engine seam: what answers the prompt the pipeline built.

The pipeline (rag.py) does all that surrounds an answer: the QA cache, retrieval, the
passages fitted to the prompt, the chat messages, citations, the write-back. It asks an
engine two things: how many tokens a text and a chat take in its model (so that passages
and history fit), and the answer to one prompt, streamed. Two engines fill the seam:

- ``LocalEngine``: in-process decoding with a ``Generator`` (ragdec's methods, the router,
  kept prompt prefixes, PiD groups, the server's batching);
- ``RemoteEngine`` (remote.py): an OpenAI-compatible server, such as vLLM, llama-server
  or another `ragdec serve`, that is sent the messages themselves.

Example::

    pipeline = RagPipeline(LocalEngine(Generator.load("smollm2-135m-instruct")))
    pipeline = RagPipeline(RemoteEngine("http://10.0.0.5:8000/v1", "Qwen/Qwen2.5-0.5B-Instruct"))
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from ragdec.decoding.generator import Generator, TextChunk
from ragdec.decoding.methods import GenerationParams

from .prompts import Prompt
from .types import Message


class EngineError(Exception):
    """The engine failed to answer (a remote server unreachable, erring or cut off
    mid-answer), not the request; the message says what happened and what to check."""


class Engine(Protocol):
    name: str  # the model that answers: the QA cache keys its answers to it
    context_length: int  # prompt and answer tokens together
    method: str | None  # what every answer is decoded by ("remote"); None: ragdec's router picks per request

    def template(self, messages: Sequence[Message]) -> list[int]:
        """The chat as the engine counts it (its model's chat template, token ids);
        ``len`` is what fitting history into the prompt measures."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone: what fitting passages into their budget measures."""
        ...

    def describe(self) -> dict:
        """What the server's /health shows of it: {"kind": "local" | "remote", ...}."""
        ...

    def stream(self, prompt: Prompt, params: GenerationParams, references: Sequence[str]) -> Iterator[TextChunk]:
        """Answer ``prompt``, yielding text as it comes; the last chunk has the finish
        reason and the stats.

        Raises:
            EngineError: the engine failed (before or after some text came).
            ValueError: the engine cannot answer this request (an unknown method, a
                prompt over the model's context).
        """
        ...


class LocalEngine:
    """In-process decoding with ``generator``: the prompt's token ids, its kept prefix
    reused, by the method the pipeline's router chose."""

    method = None  # the router picks per request

    def __init__(self, generator: Generator):
        self.generator = generator

    @property
    def name(self) -> str:
        return self.generator.name

    @property
    def context_length(self) -> int:
        return getattr(self.generator.model.config, "max_position_embeddings", None) or 1 << 30

    def template(self, messages: Sequence[Message]) -> list[int]:
        return self.generator.prompt_ids(messages)

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)

    def describe(self) -> dict:
        return {"kind": "local", "model": self.name, "context_length": self.context_length}

    def stream(self, prompt: Prompt, params: GenerationParams, references: Sequence[str]) -> Iterator[TextChunk]:
        return self.generator.stream(prompt.token_ids, params, references, prompt.prefix_len)
