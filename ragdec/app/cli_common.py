"""What the `ragdec` commands share: the model, method and decoding flags, each decoding
method's knob flags, the flags of the pipeline that `ask`, `chat` and `serve` answer with
(and of the engine it answers by: in process, or a remote OpenAI-compatible server), read
into the ``StackSettings`` that ``build.build_stack`` builds from, and the JSON writer.

Every command module (``cli_*.py``) imports from here and from no other command module;
``cli.py`` only registers them. A flag the user leaves out is None, and the layer that owns
its default (``GenerationParams``, a benchmark workload, ``RagSettings``, a method's option
dataclass) fills it in: ``given`` drops the Nones, so an explicit value that happens to
equal a default is still the user's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

# the defaults of the answering stack, kept in one place (build.py); commands name them from here
from .build import ANSWER_MAX_NEW_TOKENS, DEFAULT_DTYPE, DEFAULT_MODEL, ENGINES, StackSettings, build_stack


def given(**values) -> dict:
    """The values the user gave, by name; a flag left out (None) is left to the layer below.

    Example: ``given(max_new_tokens=None, method="llma")`` -> ``{"method": "llma"}``.
    """
    return {name: value for name, value in values.items() if value is not None}


def write_json(payload, path: str | Path) -> None:
    """``payload`` as JSON at ``path``, atomically (``ragdec.files.write_json``); says so on stderr."""
    from ragdec import files

    files.write_json(payload, path)
    print(f"wrote {path}", file=sys.stderr)


def default_db() -> Path:
    """The QA cache of `ask`, `chat`, `serve`, `cache` and `faq`: ``$RAGDEC_HOME/qa-cache.sqlite``."""
    from ragdec.models.home import ragdec_home

    return ragdec_home() / "qa-cache.sqlite"


def db_path(args) -> str | Path:
    """``--db`` (a file, or a ``postgresql://`` URL, kept as given), or ``default_db()``."""
    from ragdec.cache.backends import cache_location

    return cache_location(args.db) if args.db else default_db()


# ---- decoding flags ----------------------------------------------------------------------


def add_model_argument(parser, default: str | None = DEFAULT_MODEL, help: str = "zoo name, local folder or hub id") -> None:
    parser.add_argument("--model", default=default, help=f"{help} (default {default})" if default else help)


# the pipeline's --model: with --engine openai a model named is only a tokenizer, and none is the estimate
PIPELINE_MODEL_HELP = (f"zoo name, local folder or hub id (default {DEFAULT_MODEL}); with --engine openai, the "
                       "tokenizer that measures prompts (default: an estimate of 3 bytes a token)")


def add_dtype_argument(parser, default: str = "float32") -> None:
    """--dtype, whose help names ``default``: the answering commands' is ``DEFAULT_DTYPE``;
    generate and bench keep float32, the zoo's weights as they are."""
    from ragdec.decoding.generator import DTYPES

    parser.add_argument(
        "--dtype", choices=DTYPES, help=f"the model's weights (default {default}): float32 as the zoo holds them; "
        "bfloat16 reads prompts faster on CPUs with AMX; int4 decodes on 4-bit weights, whose steps read a fraction "
        "of float32's bytes, and reads prompts in 8 bits (bench/results/llamacpp_rag_*.json compare them); answers "
        "may differ between them"
    )


def add_generation_arguments(parser, method: str | None, max_new_tokens: int | None, method_help: str,
                             model_help: str | None = None, dtype: str = "float32") -> None:
    """--model, --method, --max-new-tokens, every method's knobs and --dtype. ``method`` and
    ``max_new_tokens`` are the command's own defaults; None leaves them to ``GenerationParams``.
    ``model_help``: --model is left None when not given, and the help says what that means.
    ``dtype``: the default the help names (the command applies it)."""
    from ragdec.decoding.methods import GenerationParams

    shown_method = GenerationParams.method if method is None else method
    shown_tokens = GenerationParams.max_new_tokens if max_new_tokens is None else max_new_tokens
    if model_help:
        add_model_argument(parser, default=None, help=model_help)
    else:
        add_model_argument(parser)
    parser.add_argument("--method", default=method, help=f"{method_help} (default {shown_method})")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens of an answer (default {shown_tokens})")
    add_method_knobs(parser)
    add_dtype_argument(parser, dtype)


def generation_params(args, **fields):
    """``GenerationParams`` of --max-new-tokens, --method and the knobs given, with ``fields``."""
    from ragdec.decoding.methods import GenerationParams

    values = given(max_new_tokens=args.max_new_tokens, method=args.method) | fields
    return GenerationParams(**values, options=method_knobs(args))


# ---- method knobs ------------------------------------------------------------------------


def add_method_knobs(parser) -> None:
    """One flag per knob of each registered method family (``method_options`` in
    ragdec/decoding/methods.py): field ``trigger_n`` of LLMAConfig becomes ``--trigger-n``,
    typed by its annotation, with the field's help and default. A knob that two families
    share is one flag. Every flag defaults to None: the method's own default applies."""
    group = parser.add_argument_group("method knobs", "each applies to the methods it names; unset: the method's default")
    for name, owners in _knobs().items():
        help = "; ".join(_knob_help(options, field) for options, field in owners)
        group.add_argument("--" + name.replace("_", "-"), dest=name, help=help.replace("%", "%%"), **_knob_type(owners[0][1]))


def method_knobs(args) -> dict:
    """The knobs given on the command line, by the papers' names (``trigger_n``, ...)."""
    flags = vars(args)
    return given(**{name: flags.get(name) for name in _knobs()})


def _knobs() -> dict[str, list[tuple[object, dataclasses.Field]]]:
    """Knob name -> the (family, field) pairs that have it, over every registered family."""
    from ragdec.decoding.methods import registered_options

    knobs: dict[str, list] = {}
    for options in registered_options().values():
        for field in dataclasses.fields(options.config_class):
            if field.metadata.get("flag", True):
                knobs.setdefault(field.name, []).append((options, field))
    return knobs


def _knob_type(field: dataclasses.Field) -> dict:
    """argparse's type and metavar for a field's annotation ("int", "float | None", "bool",
    ...). A number field that may be None also takes ``auto``: None, the method's own choice
    (and where None is the default too, the same as leaving the flag out)."""
    kind = str(field.type)
    base = kind.split("|")[0].strip()
    if base == "bool":
        return {"type": _yes_no, "metavar": "{yes,no}"}
    if base not in ("int", "float"):
        return {}
    number = int if base == "int" else float
    metavar = "N" if base == "int" else "X"
    if "None" not in kind:
        return {"type": number, "metavar": metavar}

    def number_or_auto(text: str):
        if text.lower() in ("auto", "none"):
            return None if field.default is None else "auto"  # ``method_config`` reads "auto" as None
        return number(text)

    number_or_auto.__name__ = f"{base} or auto"  # argparse's error: "invalid int or auto value: 'x'"
    return {"type": number_or_auto, "metavar": f"{metavar}|auto"}


def _yes_no(text: str) -> bool:
    if text.lower() not in ("yes", "no"):
        raise ValueError(text)
    return text.lower() == "yes"


_yes_no.__name__ = "yes or no"  # argparse's error: "invalid yes or no value: 'x'"


def _knob_help(options, field: dataclasses.Field) -> str:
    """ "bild: <the field's help> (default 0.3; bild-lossless 0.6)"; a None default is
    explained by the help itself."""
    text = f"{options.method}: {field.metadata.get('help', field.name.replace('_', ' '))}"
    if field.default is None or field.default is dataclasses.MISSING:
        return text
    defaults = [_shown(field.default)]
    if field.name in options.lossless_defaults:
        defaults.append(f"{options.method}-lossless {_shown(options.lossless_defaults[field.name])}")
    return f"{text} (default {'; '.join(defaults)})"


def _shown(value) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


# ---- ask, chat and serve: the RAG pipeline ---------------------------------------------


def add_pipeline_arguments(parser) -> None:
    """The flags of the pipeline `ask`, `chat` and `serve` answer with (``build_pipeline``);
    -k and --mode left out keep ``RagSettings``'s defaults."""
    parser.add_argument("--store", metavar="DIR", help="document store built by `ragdec index build` (none: the model alone)")
    add_generation_arguments(
        parser, method="auto", max_new_tokens=ANSWER_MAX_NEW_TOKENS,
        method_help="decoding method; auto: llma when there is text to copy, else --default-method",
        model_help=PIPELINE_MODEL_HELP, dtype=DEFAULT_DTYPE,
    )
    parser.add_argument(
        "--default-method", help="what auto picks when there is nothing to copy (default: bild-lossless for a big "
        "model whose little model is prepared, else greedy)"
    )
    parser.add_argument("-k", type=int, help="passages retrieved per question (default 5)")
    parser.add_argument("--mode", choices=("dense", "bm25", "hybrid"), help="retrieval mode (default dense)")
    parser.add_argument("--db", help="QA cache: a file, or postgresql://USER@HOST/DATABASE to share it between "
                        "processes (default: $RAGDEC_HOME/qa-cache.sqlite)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the QA cache")
    add_engine_arguments(parser)


# ---- the engine: in process, or a remote OpenAI-compatible server ------------------------

REMOTE_API_KEY_ENV = "RAGDEC_REMOTE_API_KEY"  # keeps the remote's key out of `ps`
# flags that tune in-process decoding, which a remote engine leaves to its server
LOCAL_ONLY_FLAGS = {"method": "--method", "default_method": "--default-method", "dtype": "--dtype"}


def add_engine_arguments(parser) -> None:
    """--engine and the remote engine's flags; left out, ``RemoteSettings``'s defaults."""
    from ragdec.pipelines.remote import RemoteSettings

    defaults = RemoteSettings()
    remote = parser.add_argument_group(
        "engine", "what decodes: this process, or an OpenAI-compatible server (vLLM, llama-server, another `ragdec serve`) "
        "sent the same chat messages; retrieval, the QA cache and sources stay here"
    )
    remote.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: decode in this process (default); openai: post each prompt to --base-url")
    remote.add_argument("--base-url", metavar="URL", help="openai: the server's API root, e.g. http://127.0.0.1:8001/v1")
    remote.add_argument("--remote-model", metavar="NAME", help="openai: the model the server answers with (its GET /v1/models lists them)")
    remote.add_argument("--remote-api-key", metavar="KEY",
                        help=f"openai: sent as Authorization: Bearer KEY (default: ${REMOTE_API_KEY_ENV}; unset: none)")
    remote.add_argument("--remote-context", type=int, metavar="TOKENS",
                        help=f"openai: the server's context, prompt and answer, that prompts are fitted to (default {defaults.context_length})")
    remote.add_argument("--remote-timeout", type=float, metavar="SECONDS",
                        help=f"openai: the most one answer may take, retries included (default {defaults.timeout_s:g})")
    remote.add_argument("--remote-read-timeout", type=float, metavar="SECONDS",
                        help=f"openai: the longest silence from the server, its prompt reading included (default {defaults.read_timeout_s:g})")
    remote.add_argument("--remote-retries", type=int, metavar="N",
                        help=f"openai: tries again after a refused connection, a 429 or a 503, with backoff (default {defaults.retries})")
    remote.add_argument("--remote-references", action="store_true", default=None,
                        help="openai: send the passages and history as ragdec.references, for a remote `ragdec serve` to "
                        "copy from (llama-server and vLLM ignore the field; OpenAI's API refuses it)")


def pipeline_model(args) -> str | None:
    """The model the pipeline's flags name: what answers (``StackSettings.model_name``)."""
    return StackSettings(model=args.model, engine=args.engine, remote_model=args.remote_model).model_name


def stack_settings(args) -> StackSettings:
    """The answering stack the pipeline's flags describe (``add_pipeline_arguments``): the
    QA cache at --db unless --no-cache, the weights of --dtype, or the remote engine's.

    Raises:
        ValueError: remote flags without --engine openai, or --engine openai without
            --base-url and --remote-model, or with a flag only the local engine has.
    """
    remote_flags = [f"--{name.replace('_', '-')}" for name in ("base_url", "remote_model", "remote_api_key", "remote_context",
                    "remote_timeout", "remote_read_timeout", "remote_retries", "remote_references") if getattr(args, name) is not None]
    local = {"model": args.model, "dtype": args.dtype or DEFAULT_DTYPE, "store": args.store, "k": args.k,
             "search_mode": args.mode, "default_method": args.default_method, "cache": None if args.no_cache else db_path(args)}
    if args.engine == "local":
        if remote_flags:
            raise ValueError(f"{', '.join(remote_flags)}: for a remote engine; add --engine openai (or drop them)")
        return StackSettings(**local)
    missing = [flag for flag, value in (("--base-url URL", args.base_url), ("--remote-model NAME", args.remote_model)) if not value]
    if missing:
        raise ValueError(f"--engine openai needs {' and '.join(missing)}, e.g. --base-url http://127.0.0.1:8001/v1 --remote-model NAME")
    local_only = [flag for name, flag in LOCAL_ONLY_FLAGS.items() if getattr(args, name) not in (None, "auto")] + [
        "--" + name.replace("_", "-") for name in method_knobs(args)]
    if local_only:
        raise ValueError(f"{', '.join(local_only)}: ragdec's in-process decoding; with --engine openai the server decodes its "
                         "own way (turn on its copy decoding there: vLLM's ngram speculation, llama-server's --spec-type)")
    from ragdec.pipelines.remote import RemoteSettings

    remote = RemoteSettings(**given(context_length=args.remote_context, timeout_s=args.remote_timeout,
                                    read_timeout_s=args.remote_read_timeout, retries=args.remote_retries,
                                    send_references=args.remote_references))
    api_key = args.remote_api_key or os.environ.get(REMOTE_API_KEY_ENV) or None
    return StackSettings(**local, engine="openai", base_url=args.base_url, remote_model=args.remote_model, api_key=api_key,
                         remote=remote)


def build_engine(args):
    """The engine the flags describe (``build.build_engine``): the model loaded in
    process, or the remote server of --base-url."""
    from .build import build_engine as build

    return build(stack_settings(args))


def build_pipeline(args):
    """The pipeline the flags describe (``build.build_stack``): the store opened (its
    embedder checked), the QA cache opened unless ``--no-cache``, the engine built."""
    return build_stack(stack_settings(args))
