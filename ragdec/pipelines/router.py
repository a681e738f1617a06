"""The router: which decoding method answers a request.

From what the pipeline knows of a request: references to copy from -> ``llma``; several
requests sharing one document -> ``pid`` (when the pipeline can batch them); otherwise the
configured default (``default_method``: bild-lossless for a big model whose little
model is prepared, else greedy). A method named in the request's params always wins (``auto`` asks
the router).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .types import AUTO


def default_method(model_name: str) -> str:
    """What answers requests with nothing to copy: ``bild-lossless`` when ``model_name``
    is a big model the zoo pairs with a little one and both are prepared, else ``greedy``.

    bild-lossless, not bild: its answers are the big model's own, and it was faster than
    greedy on every workload measured (bench/results/bild_*.json), while lossy bild lost
    ROUGE-L on SQuAD's short answers (bench/results/bild_squad.json). Ask for ``bild`` by name.

    Example: qwen2.5-coder-1.5b-instruct with qwen2.5-coder-0.5b-instruct prepared ->
    bild-lossless; qwen2.5-coder-0.5b-instruct (no little model) -> greedy.
    """
    from ragdec.decoding.bild import LITTLE_MODELS
    from ragdec.models.zoo import model_status

    little = LITTLE_MODELS.get(Path(model_name).name)
    if little and all(model_status(name) == "prepared" for name in (Path(model_name).name, little)):
        return "bild-lossless"
    return "greedy"


@dataclass(frozen=True)
class Router:
    default: str = "greedy"  # for requests with nothing to copy
    with_references: str = "llma"
    shared_document: str = "pid"  # for a group of requests sharing a document...
    shared_document_with_references: str = "pid-llma"  # ...that rows can also copy from

    def choose(self, method: str, has_references: bool, group_size: int = 1, batch_methods: frozenset[str] = frozenset()) -> str:
        """The method for one request.

        Args:
            method: the request's own choice; anything but ``auto`` is kept.
            has_references: the request has text to copy from (passages, near-hit answers,
                earlier turns, a document).
            group_size: how many requests of the batch share its references.
            batch_methods: batch methods the pipeline can run (a group goes to
                ``shared_document`` only when it is among them).
        """
        if method != AUTO:
            return method
        if group_size > 1:
            batch = self.shared_document_with_references if has_references else self.shared_document
            if batch in batch_methods:
                return batch
        if has_references:
            return self.with_references
        return self.default
