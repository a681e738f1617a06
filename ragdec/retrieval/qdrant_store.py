"""The Qdrant backend: vectors, BM25 sparse vectors and passages in one Qdrant collection.

    ragdec index build docs/ --store docs.store --qdrant http://qdrant:6333
    ragdec index search "..." --store docs.store     # on any machine with the folder's manifest

Each passage is a point: its id, a ``dense`` vector (the embedder's unit vector; Dot
distance, which is FAISS's inner product), a ``bm25`` sparse vector (``sparse.py``; the
collection's ``Modifier.IDF`` supplies the idf) and the passage's fields as payload, so a
reader needs nothing but the manifest and the server: replicas of ``ragdec serve`` share
the corpus through the collection.

The store's collection name (``--collection``, by default the store folder's name) is an
alias. The first build and every ``--rebuild`` fill a new collection ``<name>-g<N>-<tag>``
and then move the alias to it in one step, so readers see the old corpus or the new one,
never half of one; the old collection is then deleted. A later build changes the collection
in place: it upserts the new passages, then deletes the points that the documents file no
longer holds (which also clears the points of a save that died midway), then checks the
ids. Qdrant has no transaction over several requests: a search during such a save may see a
changed file's new passages beside its old ones, never neither.

Where Qdrant runs: a server (``http://`` or ``https://`` URL; ``$QDRANT_API_KEY`` is sent
when set), or ``:memory:`` (tests), a collection held by this process only: a registry keyed
by collection name lets ``Retriever.open`` find what ``open_for_writing`` built in the same
process. A file path is refused: Qdrant's local on-disk mode stores points as pickles,
which can run code when loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from .backends import ServerTarget, check_read_back, passage_vectors
from .persistence import FORMAT, Manifest, Settings, StoreError, rebuild_hint
from .sparse import average_length, passage_terms, passage_vector, query_vector
from .store import DocumentStore, Passage

MEMORY = ":memory:"
DENSE = "dense"  # the named vectors of every point
BM25 = "bm25"
UPSERT_BATCH = 256  # points per upsert request
SCROLL_PAGE = 10_000  # ids per scroll request when a save lists the collection
API_KEY_VARIABLE = "QDRANT_API_KEY"
_PAYLOAD = ("text", "title", "source", "record", "position", "content_hash")  # Passage's fields but the id
_URL = re.compile(r"^https?://[^/\s]+")

# collection name -> (client, lock) of the ":memory:" collections this process built; local
# mode is not thread-safe, so every call on one of these clients holds its lock
_memory_clients: dict[str, tuple[object, threading.RLock]] = {}
_memory_registry_lock = threading.Lock()


def import_qdrant():
    """qdrant_client, imported on first use.

    Raises:
        StoreError: it is not installed (a ValueError, so the command line prints the hint
            as one line).
    """
    try:
        import qdrant_client
    except ImportError:
        raise StoreError(
            "qdrant-client is not installed, and this store keeps its passages in Qdrant: "
            "pip install 'ragdec[qdrant]' (or pip install qdrant-client==1.20.0)"
        ) from None
    return qdrant_client


def check_url(url: str) -> None:
    """Refuse what ragdec does not open as a Qdrant: anything but a server URL or ``:memory:``.

    Raises:
        StoreError: saying why, and what to give instead.
    """
    if url == MEMORY or _URL.match(url):
        return
    guess = f" (did you mean http://{url}?)" if re.fullmatch(r"[\w.-]+:\d+", url) else ""
    raise StoreError(
        f"--qdrant {url!r} is not a Qdrant server URL{guess}: give http://HOST:6333 (or https://...), "
        f"or {MEMORY} for a collection that lives in this process only (tests). A folder or file path "
        "is refused: Qdrant's local on-disk mode stores points as pickles, which can run code when loaded"
    )


@dataclass(frozen=True)
class QdrantTarget(ServerTarget):
    """Where a store's collection lives."""

    url: str  # ":memory:", or the server's http(s) URL
    collection: str  # the alias readers search; the store folder's name by default
    backend: ClassVar[str] = "qdrant"
    place: ClassVar[str] = "collection"

    def __post_init__(self) -> None:
        check_url(self.url)
        if not self.collection or re.search(r'[<>:"/\\|?*\x00]', self.collection) or len(self.collection) > 200:
            raise StoreError(
                f"--collection {self.collection!r} is not a usable Qdrant collection name: "
                "use letters, digits, '.', '_' and '-' (200 characters at most)"
            )

    @staticmethod
    def place_for(folder_name: str) -> str:
        """Example: ``QdrantTarget.for_store("http://q:6333", "~/my docs.store")`` ->
        collection ``"my_docs.store"``."""
        return re.sub(r"[^\w.-]", "_", folder_name) or "ragdec"

    def __str__(self) -> str:
        return f"Qdrant collection {self.collection!r} at {self.url}"


def location(record: dict) -> str:
    return str(QdrantTarget.from_record(record))


def _connect(target: QdrantTarget, create: bool):
    """(client, lock or None) for the target; None for a ``:memory:`` collection that this
    process did not build (and ``create`` is False)."""
    qdrant_client = import_qdrant()
    if target.url != MEMORY:
        # no version check: it would be one more request, and a warning instead of an error
        client = qdrant_client.QdrantClient(url=target.url, api_key=os.environ.get(API_KEY_VARIABLE) or None,
                                            check_compatibility=False)
        return client, None
    with _memory_registry_lock:
        if target.collection not in _memory_clients and create:
            _memory_clients[target.collection] = (qdrant_client.QdrantClient(MEMORY), threading.RLock())
        return _memory_clients.get(target.collection, (None, None))


def _memory_elsewhere(folder: Path) -> StoreError:
    return StoreError(
        f"store {folder} was built on Qdrant {MEMORY}, which lived only in the process that built it "
        f"(a test); rebuild it on a Qdrant server to search it from here: "
        f"ragdec index build PATH... --store {folder} --rebuild --qdrant http://HOST:6333"
    )


@contextlib.contextmanager
def _reaching(target: QdrantTarget, lock):
    """Hold the client's lock (``:memory:``) and turn Qdrant's transport and HTTP errors
    into a ``StoreError`` that names the server and what to check."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    with lock if lock is not None else contextlib.nullcontext():
        try:
            yield
        except ResponseHandlingException as error:
            raise StoreError(
                f"cannot reach Qdrant at {target.url} ({error}): check that the server is running and that "
                "the URL's scheme, host and port are right (Qdrant's HTTP port is 6333)"
            ) from None
        except UnexpectedResponse as error:
            hint = (f"set ${API_KEY_VARIABLE} to the server's API key" if error.status_code in (401, 403)
                    else "see the server's log")
            detail = error.content.decode("utf-8", "replace")[:300] if error.content else error.reason_phrase
            raise StoreError(f"Qdrant at {target.url} refused a request on collection {target.collection!r} "
                             f"({error.status_code}: {detail}): {hint}") from None


@dataclass
class QdrantBackend:
    """A store's collection: searched by readers, filled by one writer (``publish``)."""

    client: object  # qdrant_client.QdrantClient
    target: QdrantTarget
    dimension: int  # of the dense vectors
    lock: object = None  # the ":memory:" client's lock; None for a server
    documents: DocumentStore | None = None  # the writer's working documents file; None for readers
    bm25_avgdl: float | None = None  # mean tokens per passage, fixed at the collection's build (sparse.py)
    new_collection: bool = False  # the next publish fills a new collection and moves the alias to it
    exists: bool = True  # whether the alias resolves yet (a new store's does after its first save)
    # passage id -> (passage, vector float32 [d], term counts), waiting for publish
    _pending: dict = field(default_factory=dict, repr=False)
    manifest_format: ClassVar[int] = FORMAT

    def _reaching(self):
        return _reaching(self.target, self.lock)

    def __len__(self) -> int:
        if self.documents is not None:
            return len(self.documents)
        with self._reaching():
            return int(self.client.count(self.target.collection, exact=True).count)

    # --- search -------------------------------------------------------------------------

    def dense(self, vectors, k: int) -> list[list[tuple[int, float]]]:
        import numpy as np
        from qdrant_client import models

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        requests = [models.QueryRequest(query=v.tolist(), using=DENSE, limit=k) for v in vectors]
        return self._query(requests, len(vectors), k)

    def keywords(self, questions: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        from qdrant_client import models

        queries = [query_vector(question) for question in questions]
        asked = [i for i, (indices, _) in enumerate(queries) if indices]  # a question without a word matches nothing
        requests = [models.QueryRequest(query=models.SparseVector(indices=queries[i][0], values=queries[i][1]),
                                        using=BM25, limit=k) for i in asked]
        rankings: list[list[tuple[int, float]]] = [[] for _ in questions]
        for i, ranking in zip(asked, self._query(requests, len(asked), k)):
            rankings[i] = ranking
        return rankings

    def _query(self, requests, n: int, k: int) -> list[list[tuple[int, float]]]:
        if not requests or k <= 0 or not self.exists:
            return [[] for _ in range(n)]
        with self._reaching():
            responses = self.client.query_batch_points(self.target.collection, requests=requests)
        return [[(int(point.id), float(point.score)) for point in response.points] for response in responses]

    def passages(self, ids: Sequence[int]) -> dict[int, Passage]:
        ids = [int(i) for i in ids]
        if not ids or not self.exists:
            return {}
        with self._reaching():
            records = self.client.retrieve(self.target.collection, ids=ids, with_payload=True, with_vectors=False)
        return {int(r.id): Passage(int(r.id), *(r.payload[name] for name in _PAYLOAD)) for r in records}

    def close(self) -> None:
        if self.documents is not None:
            self.documents.close()
        if self.target.url != MEMORY:  # the registry keeps ":memory:" collections for the process
            self.client.close()

    # --- writing ------------------------------------------------------------------------

    def add(self, passages: Sequence[Passage], vectors) -> None:
        if not passages:
            return
        vectors = passage_vectors(passages, vectors, self.dimension)
        terms = passage_terms([p.title for p in passages], [p.text for p in passages])
        for passage, vector, counts in zip(passages, vectors, terms):
            self._pending[passage.id] = (passage, vector, counts)

    def remove(self, ids: Sequence[int]) -> None:
        # points already in the collection go at publish: it deletes whatever the documents
        # file no longer holds
        for i in ids:
            self._pending.pop(int(i), None)

    def describe(self, settings: Settings) -> tuple[dict, dict]:
        if self.new_collection or self.bm25_avgdl is None:  # a build from scratch measures its passages
            measured = average_length([counts for _, _, counts in self._pending.values()])
            # rounded as recorded, so that later writers weigh terms exactly as this one
            self.bm25_avgdl = None if measured is None else round(measured, 3)
        return {"kind": "qdrant", "distance": "dot"}, self.target.record() | {"bm25_avgdl": self.bm25_avgdl}

    def publish(self, folder: Path, manifest: Manifest, passage_ids: Sequence[int]) -> None:
        """Upsert the pending passages, delete the points of passages gone, check the ids;
        for a new collection, then move the alias to it (see the module's docstring)."""
        alias = self.target.collection
        with self._reaching():
            points_collection = self._create_collection(manifest.generation) if self.new_collection else alias
            self._upsert(points_collection)
            wanted = {int(i) for i in passage_ids}
            if not self.new_collection:
                stale = sorted(self._point_ids(points_collection) - wanted)
                if stale:
                    from qdrant_client import models

                    self.client.delete(points_collection, points_selector=models.PointIdsList(points=stale))
            self._check(folder, points_collection, wanted)
            if self.new_collection:
                self._move_alias(points_collection)
        self._pending.clear()
        self.new_collection = False
        self.exists = True

    def _create_collection(self, generation: int) -> str:
        from qdrant_client import models

        name = f"{self.target.collection}-g{generation}-{secrets.token_hex(3)}"  # see _build_collections
        self.client.create_collection(
            name,
            vectors_config={DENSE: models.VectorParams(size=self.dimension, distance=models.Distance.DOT)},
            sparse_vectors_config={BM25: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        return name

    def _upsert(self, collection: str) -> None:
        from qdrant_client import models

        pending = list(self._pending.values())
        if pending and self.bm25_avgdl is None:
            raise StoreError("BM25's average passage length is unknown; call describe() before publish()")
        for start in range(0, len(pending), UPSERT_BATCH):
            points = []
            for passage, vector, counts in pending[start : start + UPSERT_BATCH]:
                indices, values = passage_vector(counts, self.bm25_avgdl)
                payload = {name: value for name, value in asdict(passage).items() if name in _PAYLOAD}
                points.append(models.PointStruct(
                    id=passage.id,
                    vector={DENSE: vector.tolist(), BM25: models.SparseVector(indices=indices, values=values)},
                    payload=payload,
                ))
            self.client.upsert(collection, points=points, wait=True)

    def _point_ids(self, collection: str) -> set[int]:
        ids: set[int] = set()
        offset = None
        while True:
            records, offset = self.client.scroll(collection, limit=SCROLL_PAGE, offset=offset,
                                                 with_payload=False, with_vectors=False)
            ids.update(int(r.id) for r in records)
            if offset is None:
                return ids

    def _check(self, folder: Path, collection: str, wanted: set[int]) -> None:
        check_read_back(self.target, "point", self._point_ids(collection), wanted, folder)

    def _move_alias(self, collection: str) -> None:
        """Point the store's alias at ``collection`` in one step; delete the collections it
        pointed to before (and those of builds that died before this step)."""
        from qdrant_client import models

        alias = self.target.collection
        operations = []
        if alias in _aliases(self.client):
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        self.client.update_collection_aliases(change_aliases_operations=operations)
        for name in _build_collections(self.client, alias):
            if name != collection:
                self.client.delete_collection(name)


def drop(target: QdrantTarget) -> None:
    """Delete a store's collection: the alias and the collections of its builds (what a
    benchmark made for itself). The store folder's manifest then points at nothing."""
    client, lock = _connect(target, create=False)
    if client is None:
        return
    with _reaching(target, lock):
        if target.collection in _aliases(client):
            from qdrant_client import models

            client.update_collection_aliases(change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=target.collection))])
        for name in _build_collections(client, target.collection):
            client.delete_collection(name)
    if target.url == MEMORY:
        with _memory_registry_lock:
            _memory_clients.pop(target.collection, None)
    else:
        client.close()


def _build_collections(client, alias: str) -> list[str]:
    """The collections that builds of the store ``alias`` made (``<alias>-g<N>-<tag>``)."""
    ours = re.compile(re.escape(alias) + r"-g\d+-[0-9a-f]{6}")
    return [c.name for c in client.get_collections().collections if ours.fullmatch(c.name)]


def _aliases(client) -> dict[str, str]:
    return {a.alias_name: a.collection_name for a in client.get_aliases().aliases}


def _dense_size(client, alias: str) -> int | None:
    """The dense vectors' dimension of the collection behind ``alias``; None when it is not
    a collection ragdec made (no ``dense`` vector or no ``bm25`` sparse vector)."""
    params = client.get_collection(alias).config.params
    vectors, sparse = params.vectors, params.sparse_vectors or {}
    if not isinstance(vectors, dict) or DENSE not in vectors or BM25 not in sparse:
        return None
    return vectors[DENSE].size


def _check_collection(folder: Path, backend: QdrantBackend) -> None:
    """Refuse a collection that is not this store's: another layout or another dimension."""
    size = _dense_size(backend.client, backend.target.collection)
    if size != backend.dimension:
        made = "was not made by ragdec" if size is None else f"holds {size}-dimensional vectors"
        raise StoreError(
            f"{backend.target} {made}, not the {backend.dimension}-dimensional vectors of store {folder}: "
            f"give the right --collection, or {rebuild_hint(folder)}"
        )


def open_reader(folder: Path, manifest: Manifest, nprobe: int | None = None) -> QdrantBackend:
    """The store's collection, for search; needs nothing in ``folder`` but the manifest
    (``nprobe`` is FAISS's: Qdrant has no IVF cells)."""
    target = QdrantTarget.from_record(manifest.backend)
    client, lock = _connect(target, create=False)
    if client is None:
        raise _memory_elsewhere(folder)
    backend = QdrantBackend(client, target, manifest.embedder["dimension"], lock)
    with backend._reaching():
        if not client.collection_exists(target.collection):
            backend.close()
            raise StoreError(f"{target} does not exist (deleted, or another server?): check --qdrant's URL, "
                             f"or {rebuild_hint(folder)}")
        _check_collection(folder, backend)
    return backend


def open_writer(folder: Path, manifest: Manifest | None, record: dict, dimension: int, rebuild: bool) -> QdrantBackend:
    """The collection to add to, continuing ``manifest``'s generation; or, for a new store
    (``manifest`` None) or a rebuild, a new collection filled at the first save.

    Raises:
        StoreError: the collection is gone or not this store's; a new store folder would
            take over another store's collection (without ``rebuild``).
    """
    target = QdrantTarget.from_record(record)
    client, lock = _connect(target, create=True)
    continuing = manifest is not None and not rebuild
    if continuing and target.url == MEMORY and not client.collection_exists(target.collection):
        raise _memory_elsewhere(folder)
    backend = QdrantBackend(client, target, dimension, lock, bm25_avgdl=record.get("bm25_avgdl") if continuing else None,
                            new_collection=not continuing)
    with backend._reaching():
        backend.exists = client.collection_exists(target.collection)
        if continuing:
            if not backend.exists:
                raise StoreError(f"{target} does not exist (deleted, or another server?): {rebuild_hint(folder)}")
            _check_collection(folder, backend)
        elif target.collection in {c.name for c in client.get_collections().collections}:
            raise StoreError(f"{target} is a collection, not the alias of a ragdec store: give another --collection")
        elif backend.exists and not rebuild:
            raise StoreError(f"{target} already holds a store that {folder} did not build: give another "
                             "--collection, or add --rebuild to replace it")
    return backend
