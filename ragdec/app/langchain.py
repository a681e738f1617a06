"""LangChain classes over ragdec: a chat model, an LLM, a retriever and the embeddings.

Imported on its own so that the rest of ragdec never loads langchain-core::

    from ragdec.app.langchain import ChatRagdec, RagdecLLM, RagdecRetriever, RagdecEmbeddings

    chat = ChatRagdec(store="docs.store", max_tokens=128)       # the model and weights of `ragdec ask`
    chat.invoke("Where does the Rhine begin?").content          # answered over the store's passages
    chat.invoke("...").response_metadata["ragdec"]["sources"]    # the passages it was given

Every class speaks to ragdec through a pipeline (``Request`` in, ``Chunk`` out): the chat
model builds a ``RagPipeline`` from its fields with the builder every entry point uses
(``build.build_stack``: the model and weights of `ragdec ask`, int4 unless ``dtype`` says
otherwise), or takes one ready (``pipeline=``). It decodes in process, or on an
OpenAI-compatible server (``engine="openai"``, as `ragdec ask --engine openai`):
retrieval, sources and the stats stay the same::

    chat = ChatRagdec(engine="openai", base_url="http://10.0.0.5:8000/v1", remote_model="Qwen/Qwen2.5-0.5B-Instruct",
                      store="docs.store")

Temperature: ragdec decodes greedily (its copy decoders are lossless only under greedy
decoding, so a sampled answer would need another decoder). ``temperature`` is accepted as
0 or None and refused above 0 at construction: a model built in code that silently ignored
the setting would hand its programmer deterministic answers they did not ask for.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Iterator, Sequence

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel, LLM
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from langchain_core.retrievers import BaseRetriever
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("langchain-core is not installed: pip install langchain-core==1.7.2") from error
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.types import AUTO, Chunk, Request
from ragdec.retrieval.langchain import RagdecEmbeddings

from .build import ANSWER_MAX_NEW_TOKENS, DEFAULT_DTYPE, DEFAULT_MODEL, ENGINES, StackSettings, build_stack, open_store

__all__ = ["ChatRagdec", "RagdecLLM", "RagdecRetriever", "RagdecEmbeddings", "to_openai_messages"]

DEFAULT_MAX_TOKENS = ANSWER_MAX_NEW_TOKENS

# ---- one decode at a time where the engine needs it -------------------------------------

_lock_lock = threading.Lock()
_decode_locks: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()


def _decode_lock(pipeline):
    """One decode at a time per engine: LangChain's ``batch`` runs calls in threads, and an
    in-process model's kept-prefix store is not safe to share between concurrent decodes.
    An engine that batches (a remote server, a local engine whose batch is started) takes
    concurrent streams: no lock. Chat models naming one model share its engine
    (``build_stack(shared=True)``), and so its lock."""
    engine = pipeline.engine
    if engine.batches:
        return contextlib.nullcontext()
    with _lock_lock:
        return _decode_locks.setdefault(engine, threading.Lock())


def serialized_stream(pipeline, requests: Sequence[Request]) -> Iterator[Chunk]:
    """``pipeline.stream(requests)`` while holding its engine's decode lock."""
    with _decode_lock(pipeline):
        yield from pipeline.stream(requests)


# ---- messages ---------------------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ragdec models read text only; a message holds a {kind!r} block: send its text instead")
    return "".join(parts)


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as OpenAI-style dicts, consecutive messages of one role merged
    (chat templates expect turns to alternate).

    Example: [System "a", System "b", Human "hi"] -> [{"system", "a\\n\\nb"}, {"user", "hi"}].
    """
    out: list[dict] = []
    for message in messages:
        role = _ROLES.get(getattr(message, "role", None) or message.type)
        if role is None:
            raise ValueError(f"ragdec cannot answer {message.type!r} messages (no tool calling): send system, human and ai messages")
        text = _text_of(message.content)
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


# ---- the chat model ---------------------------------------------------------------------


class ChatRagdec(BaseChatModel):
    """A LangChain chat model answered by a ragdec pipeline (retrieval, QA cache, copy decoders).

    Args:
        model: the answer model: a zoo name, a local folder or a hub id. With
            ``engine="openai"``, named or not: the tokenizer that measures prompts (not
            named: an estimate), and ``remote_model`` answers.
        dtype: the local model's weights: "int4" (the default of every entry point),
            "float32" (the zoo's weights as they are) or "bfloat16".
        store: a document store built by ``ragdec index build``; None answers from the
            messages alone.
        k, search_mode: passages retrieved per question, and how ("dense", "bm25", "hybrid").
        method: the decoding method; ``auto`` copies (LLMA) when there is text to copy.
        temperature: 0 or None only (greedy; see the module docstring).
        max_tokens: the most new tokens of an answer.
        stop: stop strings; the answer ends before the first.
        timeout: seconds a call may take before ``TimeoutError`` (None: no limit); checked
            as each piece of the answer arrives.
        max_retries: retries of a call that failed before any text came out, for errors
            other than bad input or a timeout (a remote pipeline's connection, say).
        engine: "local" (decode in process) or "openai" (an OpenAI-compatible server).
        base_url, remote_model, api_key: the server's API root (``http://HOST:PORT/v1``),
            the model it answers with, and its key (None: none); for ``engine="openai"``.
        remote_context: the server's context in tokens (None: ``RemoteSettings``'s default).
        pipeline: a ready ``RagPipeline`` to use instead of building one from the fields above.

    Example::

        chat = ChatRagdec(model="smollm2-135m-instruct", store="docs.store", max_tokens=64)
        for chunk in chat.stream("Who was Nikola Tesla?"):
            print(chunk.content, end="")
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str = Field(default=DEFAULT_MODEL, alias="model_name")
    dtype: str = DEFAULT_DTYPE
    store: str | None = None
    k: int = 5
    search_mode: str = "dense"
    method: str = AUTO
    temperature: float | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    stop: list[str] | None = None
    timeout: float | None = None
    max_retries: int = 2
    streaming: bool = False  # ``invoke`` streams internally (callbacks see each token)
    engine: str = "local"
    base_url: str | None = None
    remote_model: str | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    remote_context: int | None = None
    pipeline: Any = Field(default=None, exclude=True)
    _tokenizer: str | None = PrivateAttr(default=None)  # engine="openai": the model named to measure prompts with

    @field_validator("temperature")
    @classmethod
    def _greedy_only(cls, value: float | None) -> float | None:
        if value is not None and value > 0:
            raise ValueError(
                f"temperature={value}: ragdec decodes greedily (its copy decoders are lossless only under "
                "greedy decoding); pass temperature=0 or leave it unset"
            )
        return value

    @model_validator(mode="after")
    def _model_of_pipeline(self) -> "ChatRagdec":
        if self.pipeline is not None and "model" not in self.model_fields_set:
            self.model = self.pipeline.engine.name
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: choose 'local' (in process) or 'openai' (an OpenAI-compatible server)")
        if self.engine == "openai" and self.pipeline is None:
            if not self.base_url or not self.remote_model:
                raise ValueError("engine='openai' needs base_url (e.g. 'http://127.0.0.1:8001/v1') and remote_model "
                                 "(the model the server answers with)")
            self._tokenizer = self.model if "model" in self.model_fields_set else None
            self.model = self.remote_model  # what answers: the name callers ask for, and the stats report
        return self

    # ---- what LangChain asks of a chat model ----------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "ragdec-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes an answer: the same params give the same text (greedy)."""
        where = {"engine": self.engine, "base_url": self.base_url} if self.engine != "local" else {"dtype": self.dtype}
        return {
            "model_name": self.model,
            **where,
            "store": self.store,
            "k": self.k,
            "search_mode": self.search_mode,
            "method": self.method,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ragdec"
        params["ls_model_name"] = kwargs.get("model") or self.model
        params["ls_temperature"] = 0.0
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        texts: list[str] = []
        last = None
        for chunk in self._chunks(messages, stop, **kwargs):
            if chunk.text and run_manager:
                run_manager.on_llm_new_token(chunk.text)
            texts.append(chunk.text)
            last = chunk
        message = AIMessage(content="".join(texts), **self._final_fields(last))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": last.finish_reason})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, **kwargs):
            if chunk.finish_reason is None:
                message = AIMessageChunk(content=chunk.text)
                info = None
            else:
                message = AIMessageChunk(content=chunk.text, chunk_position="last", **self._final_fields(chunk))
                info = {"finish_reason": chunk.finish_reason}
            generation = ChatGenerationChunk(message=message, generation_info=info)
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=generation)
            yield generation

    # ---- the pipeline behind it -----------------------------------------------------------

    def _pipeline(self):
        if self.pipeline is None:
            self.pipeline = build_stack(self.stack_settings(), shared=True)
        return self.pipeline

    def stack_settings(self) -> StackSettings:
        """The answering stack these fields describe: what ``build_stack`` builds on the
        first call (a ``pipeline=`` given ready is used as it is). No QA cache: a chat
        model's answers go to its caller, and LangChain has caches of its own."""
        from ragdec.pipelines.remote import RemoteSettings

        if self.engine == "local":
            return StackSettings(model=self.model, dtype=self.dtype, store=self.store, k=self.k, search_mode=self.search_mode)
        remote = RemoteSettings(context_length=self.remote_context) if self.remote_context else None
        return StackSettings(model=self._tokenizer, engine=self.engine, store=self.store, k=self.k, search_mode=self.search_mode,
                             base_url=self.base_url, remote_model=self.remote_model, api_key=self.api_key, remote=remote)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> Request:
        model = kwargs.get("model")
        if model and model != self.model:
            raise ValueError(f"this ChatRagdec serves {self.model!r}, not {model!r}: make another ChatRagdec(model={model!r})")
        self._greedy_only(kwargs.get("temperature"))
        max_tokens = kwargs.get("max_tokens") or self.max_tokens or DEFAULT_MAX_TOKENS
        params = GenerationParams(
            max_new_tokens=max_tokens,
            stop=tuple(stop if stop is not None else self.stop or ()),
            method=kwargs.get("method") or self.method,
        )
        return Request(to_openai_messages(messages), params=params)

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> Iterator[Chunk]:
        """The pipeline's chunks for one call: timeout enforced, failed starts retried.

        Raises:
            ValueError: a request the pipeline refused (the message says what to change).
            TimeoutError: the answer took longer than ``timeout`` seconds.
        """
        request = self._request(messages, stop, **kwargs)
        pipeline = self._pipeline()
        started = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            produced = False
            stream = serialized_stream(pipeline, [request])
            try:
                for chunk in stream:
                    if chunk.finish_reason == "error":
                        raise ValueError(chunk.info.error if chunk.info else "the pipeline could not answer")
                    produced = True
                    yield chunk
                    if chunk.finish_reason is None and self.timeout is not None and time.perf_counter() - started > self.timeout:
                        raise TimeoutError(
                            f"the answer took over timeout={self.timeout} s: raise the timeout or lower max_tokens"
                        )
                return
            except (ValueError, TimeoutError):
                raise
            except Exception:
                if produced or attempt == self.max_retries:
                    raise
            finally:
                stream.close()

    def _final_fields(self, chunk: Chunk) -> dict:
        """usage_metadata and response_metadata of the last chunk: model, finish reason,
        and ragdec's sources, cache outcome and decoding stats."""
        stats, info = chunk.stats, chunk.info
        metadata: dict[str, Any] = {"model_name": self.model, "model_provider": "ragdec", "finish_reason": chunk.finish_reason}
        if info is not None:
            metadata["ragdec"] = {**info.as_dict(), "stats": stats.as_dict() if stats else None}
        fields: dict[str, Any] = {"response_metadata": metadata}
        prompt_tokens = stats.prompt_tokens if stats else 0
        new_tokens = stats.new_tokens if stats else 0
        fields["usage_metadata"] = {"input_tokens": prompt_tokens, "output_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens}
        return fields


# ---- the LLM ----------------------------------------------------------------------------


class RagdecLLM(LLM):
    """A text-in, text-out LangChain LLM over ``ChatRagdec`` (the prompt is one user message).

    Example::

        llm = RagdecLLM(model="smollm2-135m-instruct", max_tokens=32)   # or RagdecLLM(chat=ChatRagdec(...))
        llm.invoke("Name a planet.")
    """

    chat: ChatRagdec

    @model_validator(mode="before")
    @classmethod
    def _chat_from_fields(cls, values: Any) -> Any:
        if isinstance(values, dict) and "chat" not in values:
            own = {"cache", "verbose", "callbacks", "tags", "metadata", "custom_get_token_ids"}
            values = {**{k: v for k, v in values.items() if k in own},
                      "chat": ChatRagdec(**{k: v for k, v in values.items() if k not in own})}
        return values

    @property
    def _llm_type(self) -> str:
        return "ragdec"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.chat._identifying_params

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        from langchain_core.messages import HumanMessage

        for chunk in self.chat._chunks([HumanMessage(prompt)], stop, **kwargs):
            info = {"finish_reason": chunk.finish_reason} if chunk.finish_reason else None
            generation = GenerationChunk(text=chunk.text, generation_info=info)
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=generation)
            yield generation


# ---- the retriever ----------------------------------------------------------------------


class RagdecRetriever(BaseRetriever):
    """The passages of a ragdec store as LangChain ``Document``s.

    Args:
        store: the store folder (opened once per process), or ``retriever``: an open
            ``ragdec.retrieval.Retriever``.
        k: passages returned (``invoke(query, k=3)`` overrides it per call).
        search_mode: "dense", "bm25" or "hybrid".

    Example::

        docs = RagdecRetriever(store="docs.store", k=3).invoke("when was Tesla born?")
        docs[0].metadata      # {"id": 17, "title": "Nikola Tesla", "score": 0.71, "rank": 1, "source": ...}
    """

    store: str | None = None
    retriever: Any = Field(default=None, exclude=True)
    k: int = 4
    search_mode: str = "dense"

    @model_validator(mode="after")
    def _open(self) -> "RagdecRetriever":
        if self.retriever is None:
            if not self.store:
                raise ValueError("RagdecRetriever needs store= (a folder built by `ragdec index build`) or retriever=")
            self.retriever = open_store(self.store, shared=True)
        return self

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, **kwargs: Any) -> list[Document]:
        hits = self.retriever.search(query, k=k or self.k, mode=kwargs.get("search_mode", self.search_mode))
        return [
            Document(
                page_content=hit.text,
                metadata={"id": hit.id, "title": hit.title, "score": hit.score, "rank": hit.rank,
                          "source": hit.passage.source, "record": hit.passage.record},
            )
            for hit in hits
        ]
