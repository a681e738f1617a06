"""The QA store's FAISS index, kept in step with the database across connections and processes.

The database (SQLite or PostgreSQL) is the truth. Each connection holds its own index and
brings it up to date before a search, reading only what changed:

- The backend's data version (SQLite's ``PRAGMA data_version``; on PostgreSQL the epoch
  with the highest entry id and deletion number) changes when another connection commits
  (this connection's own writes set ``dirty``); when neither happened, a search reads that
  one value and nothing more.
- Entry ids only grow (never reused, assigned inside write transactions that the writers'
  lock serializes, so they commit in order), so the entries added since the last sync are
  those above the highest id seen.
- Deletions are logged in order (``deletions.seq``), so those since the last sync are
  those above the last sequence number applied.
- ``clear`` (and cutting the deletion log) bumps the settings ``epoch``: every connection
  rebuilds from scratch on its next search.

Example: process A has synced up to entry 40 and deletion 7. Process B adds entries 41 and
42 and deletes entry 12 (deletion 8). A's next search sees data_version changed, adds 41
and 42, removes 12, and remembers (42, 8).
"""

from __future__ import annotations


class IndexMirror:
    """A ``VectorIndex`` of one store's question vectors and how far it has synced."""

    def __init__(self):
        self.index = None  # VectorIndex; None until the first sync builds it
        self.epoch = None  # the settings epoch it was built at
        self.synced_id = 0  # every entry id up to this is in the index (or was deleted)
        self.deleted_seq = 0  # every logged deletion up to this is applied
        self.data_version = None  # the backend's data version at the last sync
        self.dirty = True  # this connection wrote since the last sync

    def sync(self, store):
        """The index, brought in step with what ``store`` (a QAStore) has committed; call
        with the store's lock held."""
        import numpy as np

        data_version = store.backend.data_version(store.conn)
        if self.index is not None and not self.dirty and data_version == self.data_version:
            return self.index
        new_centroids = None
        with store.read() as conn:  # one snapshot: entries and deletions agree
            epoch = conn.execute("SELECT value FROM settings WHERE key = 'epoch'").fetchone()[0]
            if self.index is None or epoch != self.epoch:
                new_centroids = self._rebuild(store, epoch)
            else:
                rows = conn.execute("SELECT id, vector FROM entries WHERE id > ? ORDER BY id", [self.synced_id]).fetchall()
                deletions = conn.execute(
                    "SELECT seq, entry_id FROM deletions WHERE seq > ? ORDER BY seq", [self.deleted_seq]
                ).fetchall()
                if deletions:
                    self.index.remove([entry_id for _, entry_id in deletions])
                    self.deleted_seq = deletions[-1][0]
                if rows:
                    ids = np.array([row[0] for row in rows], dtype=np.int64)
                    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype="<f4").reshape(len(rows), -1)
                    self.index.add(ids, vectors)
                    self.synced_id = int(ids[-1])
        # kept for the next open: training is what makes a large cache slow to open
        # (bench/results/cache.json, latency_ms.100k: first_open_s against open_s)
        if new_centroids is not None:
            with store.write() as conn:
                conn.execute(
                    "INSERT INTO centroids (id, trained_on, nlist, data) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET trained_on = excluded.trained_on, nlist = excluded.nlist, data = excluded.data", new_centroids,
                )
        self.data_version = data_version
        self.dirty = False
        return self.index

    def _rebuild(self, store, epoch: str):
        """Inside a read snapshot: the whole index from the database; returns IVF cells trained
        now, to be kept, or None."""
        import numpy as np

        from ragdec.retrieval.index import VectorIndex

        conn = store.conn
        rows = conn.execute("SELECT id, vector FROM entries ORDER BY id").fetchall()
        last_deletion = conn.execute("SELECT coalesce(max(seq), 0) FROM deletions").fetchone()[0]
        dimension = store.dimension or 1  # an empty cache without an embedder yet
        ids = np.array([row[0] for row in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype="<f4").reshape(len(rows), dimension)
        new_centroids = None
        if len(rows) == 0:
            self.index = VectorIndex.empty(dimension)
        else:
            self.index, new_centroids = build_index(conn, ids, vectors)
        self.epoch = epoch
        self.synced_id = int(ids[-1]) if len(ids) else 0
        self.deleted_seq = int(last_deletion)
        return new_centroids


def build_index(conn, ids, vectors):
    """The index over ``vectors`` [n, d] and, when IVF cells were trained for it, the cells
    to keep: (index, (trained_on, nlist, bytes) or None).

    Flat below ``IVF_MIN_VECTORS`` entries (exact). Above, IVF: over the cells stored in the
    database when they were trained on at least a quarter of today's entries (adding vectors
    to trained cells costs far less than training them), else over cells trained now.
    """
    import numpy as np

    from ragdec.retrieval.index import IndexSpec, VectorIndex, choose_spec, import_faiss

    spec = choose_spec(len(ids))
    if spec.kind == "flat":
        return VectorIndex.build(ids, vectors, spec), None
    faiss = import_faiss()
    dimension = vectors.shape[1]
    row = conn.execute("SELECT trained_on, nlist, data FROM centroids WHERE id = 1").fetchone()
    if row is None or row[0] * 4 < len(ids):
        index = VectorIndex.build(ids, vectors, spec)
        cells = index.faiss_index.quantizer.reconstruct_n(0, index.spec.nlist)
        return index, (len(ids), index.spec.nlist, np.ascontiguousarray(cells, dtype="<f4").tobytes())
    trained_on, nlist, data = row
    quantizer = faiss.IndexFlatIP(dimension)
    quantizer.add(np.frombuffer(data, dtype="<f4").reshape(nlist, dimension))
    ivf = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference to quantizer
    ivf.is_trained = True
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # delete by id, as VectorIndex.build does
    ivf.nprobe = max(1, nlist // 40)  # choose_spec's default
    ivf.add_with_ids(np.ascontiguousarray(vectors), np.asarray(ids, dtype=np.int64))
    return VectorIndex(ivf, IndexSpec("ivf", nlist, ivf.nprobe, trained_on), dimension), None
