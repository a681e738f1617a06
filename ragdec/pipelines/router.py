"""The router: which decoding method answers a request.

From what the pipeline knows of a request: references to copy from -> ``llma``; several
requests sharing one document -> ``pid`` (when the pipeline can batch them); otherwise the
configured default. A method named in the request's params always wins (``auto`` asks
the router).
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import AUTO


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
