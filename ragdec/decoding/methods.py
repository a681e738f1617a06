"""Decoding methods by name: each builds a drafter and an acceptance rule for a request.

A new method is a module that registers a factory here; the loop does not change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .greedy import ExactMatch, NoDraft
from .seam import AcceptanceRule, Drafter


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128  # answers in RAG are short; long ones can ask for more
    stop: tuple[str, ...] = ()  # stop strings; the answer's text ends before the first
    method: str = "greedy"  # a name in METHODS
    options: Mapping[str, object] = field(default_factory=dict)  # the method's knobs, e.g. trigger_n


# factory(generator, prompt_ids, references, params) -> (drafter, acceptance rule)
MethodFactory = Callable[[object, Sequence[int], Sequence[str], GenerationParams], tuple[Drafter, AcceptanceRule]]
METHODS: dict[str, MethodFactory] = {}
# methods whose output is greedy's, token for token (tests/test_lossless.py proves each one)
LOSSLESS_METHODS: set[str] = set()


def register_method(name: str, lossless: bool = False):
    """Register ``factory`` under ``name``; ``lossless=True`` promises greedy's output, which
    the test suite then checks for this method on every tiny model without further code."""

    def register(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        if lossless:
            LOSSLESS_METHODS.add(name)
        return factory

    return register


def registered_methods() -> dict[str, MethodFactory]:
    """Every registered method, the built-in modules imported first."""
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    return dict(METHODS)


@dataclass(frozen=True)
class MethodOptions:
    method: str  # the family the knobs belong to, as the command line's help names it ("bild")
    config_class: type  # a dataclass; each field is a knob (``knob`` gives it its help)
    lossless_defaults: Mapping[str, object]  # the family's lossless mode's own values ("bild-lossless")


# every method family's knobs, by family (``method_options``)
METHOD_OPTIONS: dict[str, MethodOptions] = {}


def method_options(method: str, lossless_defaults: Mapping[str, object] | None = None):
    """Register ``method``'s dataclass of knobs: other methods let its knobs pass, and the
    command line offers each field as a flag (``trigger_n`` -> ``--trigger-n``), with the
    field's help and default; ``lossless_defaults`` are what ``<method>-lossless`` uses
    instead, which the help states too."""

    def register(config_class: type) -> type:
        METHOD_OPTIONS[method] = MethodOptions(method, config_class, dict(lossless_defaults or {}))
        return config_class

    return register


def registered_options() -> dict[str, MethodOptions]:
    """Every registered family's knobs, the built-in method modules imported first."""
    registered_methods()
    return dict(METHOD_OPTIONS)


def knob(default, help: str, flag: bool = True):
    """A field of a method's option dataclass: its ``default`` and the ``help`` of its flag;
    ``flag=False`` keeps an internal knob off the command line.

    Example: ``trigger_n: int = knob(1, "shortest match that triggers a copy")`` gives
    ``--trigger-n N   llma: shortest match that triggers a copy (default 1)``.
    """
    return field(default=default, metadata={"help": help, "flag": flag})


def method_config(config_class, options: Mapping[str, object], method: str, defaults: Mapping[str, object] | None = None):
    """``config_class`` (a dataclass of a method's knobs) from ``options``, whose values may
    be strings (command line, bench specs): each is converted by its field's annotation.
    Names that are another method's knobs are ignored (the pipeline's router sends one set
    of options to whichever method it picks); names no method knows are refused with the
    known ones listed.

    ``defaults`` replace the dataclass's own defaults for this method (a lossless mode of
    one config may want other knob values); options still win over them.

    Example: LLMAConfig with {"copy_k": "auto", "trigger_n": "2", "variants": "no"} ->
    copy_k None (``auto`` and ``none`` mean None where a field may be None), trigger_n 2,
    variants False.
    """
    fields = config_class.__dataclass_fields__
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    others = {name for options in METHOD_OPTIONS.values() for name in options.config_class.__dataclass_fields__}
    unknown = set(options) - set(fields) - others
    if unknown:
        raise ValueError(f"unknown {method} option(s) {sorted(unknown)}; options: {', '.join(fields)}")
    values = dict(defaults or {})
    for name, value in options.items():
        if name not in fields:
            continue  # another method's knob (a router or a bench passes one set to every method)
        kind = str(fields[name].type)  # annotations are strings here: "int | None", "bool", ...
        base = kind.split("|")[0].strip()
        if isinstance(value, str) and value.lower() in ("auto", "none") and "None" in kind:
            value = None
        elif value is not None and base == "bool" and not isinstance(value, bool):
            value = str(value).lower() in ("1", "true", "yes")
        elif value is not None and base in ("int", "float"):
            value = (int if base == "int" else float)(value)
        values[name] = value
    return config_class(**values)


# modules that register methods; imported on first use to keep imports light
BUILTIN_METHOD_MODULES = ("ragdec.decoding.llma", "ragdec.decoding.pid", "ragdec.decoding.bild", "ragdec.decoding.free")


def method_factory(name: str) -> MethodFactory:
    registered_methods()
    if name not in METHODS:
        raise ValueError(f"unknown decoding method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@register_method("greedy", lossless=True)
def _greedy(generator, prompt_ids, references, params):
    return NoDraft(), ExactMatch()
