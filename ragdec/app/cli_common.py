"""What the `ragdec` commands share: the model, method and decoding flags, each decoding
method's knob flags, the pipeline that `ask`, `chat` and `serve` answer with, and the
JSON writer.

Every command module (``cli_*.py``) imports from here and from no other command module;
``cli.py`` only registers them. A flag the user leaves out is None, and the layer that owns
its default (``GenerationParams``, a benchmark workload, ``RagSettings``, a method's option
dataclass) fills it in: ``given`` drops the Nones, so an explicit value that happens to
equal a default is still the user's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# ask, chat and serve: an answer over passages runs longer than generate's 128 tokens
ANSWER_MAX_NEW_TOKENS = 256


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


def db_path(args) -> Path:
    """``--db``, or ``default_db()``."""
    return Path(args.db).expanduser() if args.db else default_db()


# ---- decoding flags ----------------------------------------------------------------------


def add_model_argument(parser, default: str | None = DEFAULT_MODEL, help: str = "zoo name, local folder or hub id") -> None:
    parser.add_argument("--model", default=default, help=f"{help} (default {default})" if default else help)


def add_dtype_argument(parser) -> None:
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="the model's weights (default float32); "
        "bfloat16 reads prompts 10x faster on CPUs with AMX, with output that may differ from float32's"
    )


def add_generation_arguments(parser, method: str | None, max_new_tokens: int | None, method_help: str) -> None:
    """--model, --method, --max-new-tokens, every method's knobs and --dtype. ``method`` and
    ``max_new_tokens`` are the command's own defaults; None leaves them to ``GenerationParams``."""
    from ragdec.decoding.methods import GenerationParams

    shown_method = GenerationParams.method if method is None else method
    shown_tokens = GenerationParams.max_new_tokens if max_new_tokens is None else max_new_tokens
    add_model_argument(parser)
    parser.add_argument("--method", default=method, help=f"{method_help} (default {shown_method})")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens of an answer (default {shown_tokens})")
    add_method_knobs(parser)
    add_dtype_argument(parser)


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
    )
    parser.add_argument(
        "--default-method", help="what auto picks when there is nothing to copy (default: bild-lossless for a big "
        "model whose little model is prepared, else greedy)"
    )
    parser.add_argument("-k", type=int, help="passages retrieved per question (default 5)")
    parser.add_argument("--mode", choices=("dense", "bm25", "hybrid"), help="retrieval mode (default dense)")
    parser.add_argument("--db", help="QA cache file (default: $RAGDEC_HOME/qa-cache.sqlite)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the QA cache")


def build_pipeline(args):
    """The pipeline the flags describe: the store opened (its embedder checked), the QA
    cache opened unless ``--no-cache``, the model loaded (prepared first when needed)."""
    from ragdec.decoding.generator import Generator, configure_threads
    from ragdec.pipelines.rag import RagPipeline, RagSettings
    from ragdec.pipelines.router import Router, default_method
    from ragdec.retrieval.retriever import Retriever

    configure_threads()
    retriever = None
    if args.store:
        store = Path(args.store).expanduser()
        if not store.is_dir():
            raise FileNotFoundError(f"no store at {store}: build one with `ragdec index build PATH... --store {store}`")
        retriever = Retriever.open(store)
    cache = None
    if not args.no_cache:
        from ragdec.cache.lookup import QACache

        cache = QACache.open(db_path(args))
    generator = Generator.load(args.model, args.dtype)
    settings = RagSettings(**given(k=args.k, search_mode=args.mode), cache_answers=not args.no_cache)
    return RagPipeline(generator, retriever, cache, settings, Router(default=args.default_method or default_method(args.model)))
