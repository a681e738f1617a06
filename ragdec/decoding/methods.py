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


def register_method(name: str):
    def register(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return register


# modules that register methods; imported on first use to keep imports light
BUILTIN_METHOD_MODULES = ("ragdec.decoding.llma", "ragdec.decoding.pid", "ragdec.decoding.bild", "ragdec.decoding.free")


def method_factory(name: str) -> MethodFactory:
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    if name not in METHODS:
        raise ValueError(f"unknown decoding method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@register_method("greedy")
def _greedy(generator, prompt_ids, references, params):
    return NoDraft(), ExactMatch()
