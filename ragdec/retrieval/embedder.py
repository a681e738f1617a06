"""Sentence embeddings for retrieval: E5's ``query: `` / ``passage: `` prefixes, unit vectors.

E5 was trained with a prefix on every input, and it matters: a question is embedded as
``query: <question>`` and a document as ``passage: <text>``. To compare two questions (the
QA cache), both sides take ``query: `` (``embed_questions``). Models without prefixes
(all-MiniLM-L6-v2) get none. Vectors are L2-normalized, so inner product is cosine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DEFAULT_EMBEDDER = "multilingual-e5-small"  # zoo name; 384 dimensions, 100 languages
E5_PREFIXES = {"query": "query: ", "passage": "passage: "}  # the prefixes E5 was trained with
_ZOO_MANIFEST = "ragdec-model.json"  # written by ragdec.models.zoo into prepared folders
# A few short queries are too little work to share between threads: on busy cores one
# thread embeds a question sooner than two, each of which waits at every layer for the
# other to be scheduled. Batches of passages keep every thread.
SMALL_BATCH = 8
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EmbedderInfo:
    name: str  # what was asked for: a zoo name, a local folder or a hub id
    dimension: int  # length of each vector
    version: str  # identifies the weights: the zoo's source SHA-256, else a hash of the folder
    query_prefix: str  # prepended to queries ("query: " for E5)
    passage_prefix: str  # prepended to passages ("passage: " for E5)
    max_tokens: int  # the model reads at most this many tokens, prefix and specials included
    precision: str = "float32"  # weights and matmuls in "float32" or "bfloat16"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "dimension": self.dimension,
            "version": self.version,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_tokens": self.max_tokens,
            "precision": self.precision,
        }


def _import_sentence_transformers():
    try:
        import sentence_transformers
    except ImportError as error:  # pragma: no cover - a dependency of ragdec
        raise ImportError(
            "sentence-transformers is not installed: pip install sentence-transformers==6.2.0"
        ) from error
    return sentence_transformers


def weights_version(path: str) -> str:
    """A short identifier of the weights in ``path``, stable across machines.

    A zoo folder carries the SHA-256 of the package file it was built from; any other local
    folder is identified by its config files and the names and sizes of its weight files
    (hashing hundreds of MB on every load would cost seconds); a hub id is its own version.
    """
    folder = Path(path)
    manifest = folder / _ZOO_MANIFEST
    if manifest.is_file():
        return "sha256:" + json.loads(manifest.read_text(encoding="utf-8"))["source_sha256"]
    if not folder.is_dir():
        return "hub:" + path
    digest = hashlib.sha256()
    for config in ("config.json", "modules.json", "tokenizer.json"):
        if (folder / config).is_file():
            digest.update((folder / config).read_bytes())
    for weights in sorted(folder.rglob("*")):
        if weights.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{weights.relative_to(folder)}:{weights.stat().st_size}".encode())
    return "folder:" + digest.hexdigest()[:16]


def _has_amx() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: leave as is)."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Embedder:
    """A sentence-transformers model with retrieval prefixes and normalized float32 output.

    Args:
        name: a zoo name (``multilingual-e5-small``, ``all-minilm-l6-v2``), a local
            sentence-transformers folder, or a hub id.
        batch_size: texts per forward pass when embedding passages.
        query_prefix / passage_prefix: override the prefixes; by default they come from the
            model's own ``prompts`` (``query``, ``passage``), else E5's when the name says
            E5, else none.
        precision: "bfloat16" holds the weights in bfloat16: half the memory, and on CPUs
            with AMX tiles faster than float32 with the same recall on SQuAD (measure with
            bench/retrieval.py); "auto" picks it where the CPU has AMX, else "float32".

    Example::

        embedder = Embedder("all-minilm-l6-v2")
        q = embedder.embed_queries(["where does the Rhine begin?"])      # [1, 384]
        p = embedder.embed_passages(["The Rhine begins in the Swiss Alps."])
        float(q[0] @ p[0])                                                # cosine, 0.74
    """

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDER,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        precision: str = "auto",
    ):
        from ragdec.models.zoo import resolve

        sentence_transformers = _import_sentence_transformers()
        path = resolve(name)
        self.model = sentence_transformers.SentenceTransformer(path, device=device)
        self.model.eval()
        self.batch_size = batch_size
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision == "auto":
            precision = "bfloat16" if device == "cpu" and _has_amx() else "float32"
        if precision == "bfloat16":
            import torch

            self.model.to(torch.bfloat16)
        prompts = dict(getattr(self.model, "prompts", None) or {})
        if not prompts and "e5" in name.lower():
            prompts = E5_PREFIXES
        self.info = EmbedderInfo(
            name=name,
            dimension=int(self.model.get_embedding_dimension()),
            version=weights_version(path),
            query_prefix=prompts.get("query", "") if query_prefix is None else query_prefix,
            passage_prefix=prompts.get("passage", "") if passage_prefix is None else passage_prefix,
            max_tokens=int(self.model.max_seq_length),
            precision=precision,
        )

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _encode(self, texts: Sequence[str], prefix: str, batch_size: int, progress: bool):
        import numpy as np
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.info.dimension), dtype=np.float32)
        threads = 1 if len(texts) <= SMALL_BATCH else None
        with torch.inference_mode(), _torch_threads(threads):
            vectors = self.model.encode(
                list(texts),
                prompt=prefix or None,
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_tensor=True,
            )
        # normalized here, in float32: bfloat16 leaves norms slightly off 1
        vectors = vectors.float().numpy()
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_queries(self, texts: Sequence[str]):
        """Questions to search with -> float32 [n, dimension], unit length."""
        return self._encode(texts, self.info.query_prefix, self.batch_size, False)

    def embed_passages(self, texts: Sequence[str], progress: bool = False):
        """Documents to search in -> float32 [n, dimension], unit length."""
        return self._encode(texts, self.info.passage_prefix, self.batch_size, progress)

    def embed_questions(self, texts: Sequence[str]):
        """Questions to compare with other questions: ``query: `` on both sides (E5's advice
        for symmetric tasks such as finding a paraphrase in a QA cache)."""
        return self._encode(texts, self.info.query_prefix, self.batch_size, False)

    def prefix_tokens(self) -> int:
        """Tokens the passage prefix and the special tokens take from ``max_tokens``."""
        specials = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        prefix = len(self.tokenizer(self.info.passage_prefix, add_special_tokens=False)["input_ids"])
        return specials + prefix
