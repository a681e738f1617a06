"""The engine seam: what answers the prompt the pipeline built.

The pipeline (rag.py) does all that surrounds an answer: the QA cache, retrieval, the
passages fitted to the prompt, the chat messages, citations, the write-back. It asks an
engine how many tokens a text and a chat take in its model (so that passages and history
fit), and the answer to one prompt, streamed; where the engine can, the answers to a
group of prompts that share their head (PiD) in one batch. The server asks it to batch
concurrent requests, and how that batch fares. Two engines fill the seam:

- ``LocalEngine``: in-process decoding with a ``Generator`` (ragdec's methods, the router,
  kept prompt prefixes, PiD groups, the server's continuous batching);
- ``RemoteEngine`` (remote.py): an OpenAI-compatible server, such as vLLM, llama-server
  or another `ragdec serve`, that is sent the messages themselves and batches on its own.

Nothing above this seam reaches for the generator behind it: what only one engine can do
is declared here (``answers_groups``, ``batches``), never discovered with getattr.

Example::

    pipeline = RagPipeline(LocalEngine(Generator.load("smollm2-135m-instruct")))
    pipeline = RagPipeline(RemoteEngine("http://10.0.0.5:8000/v1", "Qwen/Qwen2.5-0.5B-Instruct"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from ragdec.decoding.generator import Generator, TextChunk
from ragdec.decoding.methods import GenerationParams

from .prompts import Prompt
from .types import Message


class EngineError(Exception):
    """The engine failed to answer (a remote server unreachable, erring or cut off
    mid-answer), not the request; the message says what happened and what to check."""


@dataclass(frozen=True)
class BatchStatus:
    """How an engine's own batch fares: what the server's /health shows of it."""

    alive: bool  # the thread that steps the batch is running
    rows: int  # requests decoding or reading their prompts now
    steps: int  # batched forward steps taken
    failed_steps: int  # steps that raised: their rows failed, the batch went on
    last_error: str  # what the last failed step raised ("" when none did)
    last_step_at: float  # time.time() of the last step


class Engine(Protocol):
    name: str  # the model that answers: the QA cache keys its answers to it
    context_length: int  # prompt and answer tokens together
    method: str | None  # what every answer is decoded by ("remote"); None: ragdec's router picks per request
    # ``stream_group`` answers prompts that share their head in one batch (PiD); False: the
    # pipeline answers each request on its own
    answers_groups: bool

    @property
    def batches(self) -> bool:
        """Streams from several threads decode together, so callers need not take turns
        (a remote server; a local engine once ``start_batching``)."""
        ...

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

    def stream_group(self, prompts: Sequence[Prompt], params: GenerationParams,
                     references: Sequence[str]) -> Iterator[tuple[int, TextChunk]]:
        """Answer ``prompts`` (which share their head: system prompt, document, history) in
        one batch by ``params.method`` (pid or pid-llma); yield ``(i, chunk)`` for prompt
        ``i`` as text comes, rows interleaved, each row's last chunk with its stats.
        Only called when ``answers_groups``.

        Raises:
            ValueError: a prompt over the model's context, a method that is not PiD's.
        """
        ...

    def start_batching(self, max_batch: int) -> None:
        """From now on, concurrent ``stream`` calls share one batch of up to ``max_batch``
        rows (continuous batching). A no-op for an engine whose server batches on its own."""
        ...

    def stop_batching(self) -> None:
        """Let the batch go (its thread ends); a no-op when none was started."""
        ...

    def batch_status(self) -> BatchStatus | None:
        """The batch ``start_batching`` began, as it fares now; None when this engine keeps
        none (not started, or a remote server's own)."""
        ...


class LocalEngine:
    """In-process decoding with ``generator``: the prompt's token ids, its kept prefix
    reused, by the method the pipeline's router chose."""

    method = None  # the router picks per request
    answers_groups = True  # PiD: rows that share a prefix decode in one batch

    def __init__(self, generator: Generator):
        self.generator = generator
        self.scheduler = None  # while batching: the batch's scheduler (``Generator.start_batching``)

    @property
    def name(self) -> str:
        return self.generator.name

    @property
    def context_length(self) -> int:
        return getattr(self.generator.model.config, "max_position_embeddings", None) or 1 << 30

    @property
    def batches(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive

    def template(self, messages: Sequence[Message]) -> list[int]:
        return self.generator.prompt_ids(messages)

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)

    def describe(self) -> dict:
        return {"kind": "local", "model": self.name, "context_length": self.context_length}

    def stream(self, prompt: Prompt, params: GenerationParams, references: Sequence[str]) -> Iterator[TextChunk]:
        return self.generator.stream(prompt.token_ids, params, references, prompt.prefix_len)

    def stream_group(self, prompts: Sequence[Prompt], params: GenerationParams,
                     references: Sequence[str]) -> Iterator[tuple[int, TextChunk]]:
        from ragdec.decoding.pid import pid_stream

        return pid_stream(self.generator, [prompt.token_ids for prompt in prompts], params, references)

    def start_batching(self, max_batch: int) -> None:
        self.scheduler = self.generator.start_batching(max_batch)

    def stop_batching(self) -> None:
        if self.scheduler is not None:
            self.generator.stop_batching()
            self.scheduler = None

    def batch_status(self) -> BatchStatus | None:
        scheduler = self.scheduler
        if scheduler is None:
            return None
        return BatchStatus(scheduler.alive, scheduler.rows, scheduler.steps, scheduler.failed_steps, scheduler.last_error,
                           scheduler.last_step_at)
