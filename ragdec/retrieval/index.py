"""The vector index: FAISS over unit vectors, inner product, keyed by the store's int64 ids.

Two kinds, chosen by corpus size unless asked for (the choice is recorded in the manifest):

- ``flat`` (``IndexIDMap2`` over ``IndexFlatIP``): exact; every query reads every vector
  (1.5 KB each at 384 dimensions), which stays cheap next to embedding the question up to
  tens of thousands of passages (bench/results/retrieval.json, ``latency_ms``).
- ``ivf`` (``IndexIVFFlat``, inner product): k-means cells trained on the corpus; a query
  reads the ``nprobe`` nearest cells only. Approximate: a passage in a cell that is not
  probed is missed, so ``nprobe`` trades recall for time.

Both keep the full vectors, so either can be rebuilt as the other (``convert``), and both
delete by id. One lock serializes writers and readers: FAISS allows concurrent searches
but not a search during an add.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ragdec.files import atomic_path

# "auto" picks IVF from here on: exact search grows with the corpus, and at 100k passages
# costs nearly what embedding the question does (bench/results/retrieval.json,
# latency_ms.100k: index_ms of dense_flat against dense_ivf)
IVF_MIN_VECTORS = 50_000
IVF_TRAIN_PER_CELL = 39  # FAISS warns below 39 training points per cell
KINDS = ("auto", "flat", "ivf")
SMALL_QUERY_BATCH = 8  # searched on one thread


class IndexFileError(ValueError):
    """The index file cannot be read: damaged, truncated, or not a FAISS index."""


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("faiss is not installed: pip install faiss-cpu==1.15.1") from error
    return faiss


@dataclass(frozen=True)
class IndexSpec:
    kind: str  # "flat" | "ivf"
    nlist: int = 0  # IVF cells; about 4 * sqrt(n), so a cell holds ~sqrt(n) / 4 vectors
    nprobe: int = 0  # IVF cells read per query
    trained_on: int = 0  # vectors the IVF cells were trained on; retrain when far outgrown

    def as_dict(self) -> dict:
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe, "trained_on": self.trained_on}


def choose_spec(n: int, kind: str = "auto", nprobe: int | None = None) -> IndexSpec:
    """The index for ``n`` vectors: flat below ``IVF_MIN_VECTORS`` (or when asked), else IVF
    with ``nlist = 4 * sqrt(n)`` cells, capped so that each cell has enough training points.

    Example: n = 100_000 -> nlist = round(4 * 316.2) = 1265; nprobe defaults to
    nlist // 40 = 31 cells, about 2.5% of the vectors read per query.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "flat" or (kind == "auto" and n < IVF_MIN_VECTORS):
        return IndexSpec("flat")
    nlist = max(1, min(round(4 * math.sqrt(max(n, 1))), n // IVF_TRAIN_PER_CELL))
    return IndexSpec("ivf", nlist=nlist, nprobe=nprobe or max(1, nlist // 40), trained_on=n)


@dataclass
class VectorIndex:
    """Add, delete, upsert and search unit vectors by int64 id; safe to share between threads.

    Example::

        index = VectorIndex.empty(384)
        index.add([7, 9], vectors)          # vectors: float32 [2, 384], unit length
        scores, ids = index.search(query_vectors, k=1)   # [q, 1] each; ids[0, 0] == 7 or 9
    """

    faiss_index: object  # faiss.Index with int64 ids (IndexIDMap2 or IndexIVFFlat)
    spec: IndexSpec
    dimension: int
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def empty(cls, dimension: int) -> "VectorIndex":
        faiss = import_faiss()
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)), IndexSpec("flat"), dimension)

    @classmethod
    def build(cls, ids: Sequence[int], vectors, spec: IndexSpec) -> "VectorIndex":
        """An index of ``spec.kind`` holding ``vectors`` [n, d] under ``ids`` (IVF is trained
        on these vectors)."""
        import numpy as np

        faiss = import_faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dimension = vectors.shape[1]
        if spec.kind == "flat":
            index = cls.empty(dimension)
            index.add(ids, vectors)
            return index
        nlist = max(1, min(spec.nlist, len(vectors) // IVF_TRAIN_PER_CELL))
        quantizer = faiss.IndexFlatIP(dimension)
        ivf = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 1234  # same corpus, same cells
        ivf.train(vectors)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # delete and reconstruct by any id
        ivf.nprobe = min(spec.nprobe or 1, nlist)
        ivf.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return cls(ivf, IndexSpec("ivf", nlist, ivf.nprobe, len(vectors)), dimension)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def nprobe(self) -> int:
        return self.spec.nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Cells read per IVF query (ignored by a flat index)."""
        if self.spec.kind != "ivf":
            return
        with self._lock:
            self.faiss_index.nprobe = max(1, min(nprobe, self.spec.nlist))
            self.spec = IndexSpec("ivf", self.spec.nlist, int(self.faiss_index.nprobe), self.spec.trained_on)

    def _check(self, ids, vectors):
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"vectors must be [n, {self.dimension}], got {list(vectors.shape)}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        return ids, vectors

    def add(self, ids: Sequence[int], vectors) -> None:
        """Add new vectors; an id that is already present would be stored twice (use upsert)."""
        ids, vectors = self._check(ids, vectors)
        if len(ids) == 0:
            return
        with self._lock:
            self.faiss_index.add_with_ids(vectors, ids)

    def remove(self, ids: Sequence[int]) -> int:
        """Delete vectors by id; returns how many were present."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        faiss = import_faiss()
        with self._lock:
            if self.spec.kind == "ivf":  # the hashtable direct map finds each id in O(1)
                selector = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
            else:  # a flat index scans its ids, testing each against a hash set
                selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            return int(self.faiss_index.remove_ids(selector))

    def upsert(self, ids: Sequence[int], vectors) -> None:
        """Replace the vectors of ids that exist, add the others, as one step for readers."""
        ids, vectors = self._check(ids, vectors)
        with self._lock:
            self.remove(ids)
            self.add(ids, vectors)

    def search(self, queries, k: int):
        """Top-k by inner product: (scores float32 [q, k], ids int64 [q, k]); -1 pads a row
        when fewer than k vectors exist."""
        import numpy as np

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        faiss = import_faiss()
        with self._lock:
            if len(self) == 0 or k <= 0:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            # a lone query on busy cores is faster on one thread than waiting for a team (see
            # embedder's SMALL_BATCH); the setting is OpenMP's, shared with torch: restore it
            before = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1 if len(queries) <= SMALL_QUERY_BATCH else before)
            try:
                return self.faiss_index.search(queries, min(k, len(self)))
            finally:
                faiss.omp_set_num_threads(before)

    def ids_and_vectors(self):
        """Every (id, vector) held: int64 [n], float32 [n, d]; what a rebuild starts from."""
        import numpy as np

        faiss = import_faiss()
        with self._lock:
            if self.spec.kind == "flat":
                ids = faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)
                vectors = self.faiss_index.index.reconstruct_n(0, len(self))
                return ids, np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dimension)
            lists = self.faiss_index.invlists
            all_ids, all_vectors = [], []
            for cell in range(lists.nlist):
                size = lists.list_size(cell)
                if size == 0:
                    continue
                all_ids.append(faiss.rev_swig_ptr(lists.get_ids(cell), size).copy())
                codes = faiss.rev_swig_ptr(lists.get_codes(cell), size * lists.code_size).copy()
                all_vectors.append(codes.view(np.float32).reshape(size, self.dimension))
            if not all_ids:
                return np.zeros(0, np.int64), np.zeros((0, self.dimension), np.float32)
            return np.concatenate(all_ids).astype(np.int64), np.concatenate(all_vectors)

    def convert(self, spec: IndexSpec) -> "VectorIndex":
        """The same vectors in an index of another kind (or an IVF retrained on today's data)."""
        ids, vectors = self.ids_and_vectors()
        return VectorIndex.build(ids, vectors, spec)

    def memory_bytes(self) -> int:
        """Bytes the index takes when serialized, which is what it holds in memory."""
        faiss = import_faiss()
        with self._lock:
            return int(faiss.serialize_index(self.faiss_index).nbytes)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically (temp file, fsync, rename)."""
        faiss = import_faiss()
        with atomic_path(path) as tmp, self._lock:
            faiss.write_index(self.faiss_index, str(tmp))

    @classmethod
    def load(cls, path: str | Path, spec: IndexSpec, dimension: int) -> "VectorIndex":
        """Read an index written by ``save``.

        Raises:
            FileNotFoundError: no file at ``path``.
            IndexFileError: the file is damaged or holds something else.
        """
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index file {path} is missing")
        try:
            faiss_index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise IndexFileError(f"index file {path} is damaged ({str(error).splitlines()[0][:120]})") from error
        if faiss_index.d != dimension:
            raise IndexFileError(f"index file {path} holds {faiss_index.d}-dimensional vectors, expected {dimension}")
        if spec.kind == "ivf":
            faiss_index.nprobe = spec.nprobe
        return cls(faiss_index, spec, dimension)
