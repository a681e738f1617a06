"""Continuous batching: one thread runs the decode loop for every caller of a model.

A server answers many requests at once, each in its own thread (retrieval, the QA cache,
the prompt), but the model is one: its forwards should be shared. ``BatchScheduler`` owns
a ``BatchDecoder`` and steps it in its own thread; a caller's request becomes a row that
joins the running batch between two steps, and the row's blocks come back to the caller
on its own queue, so no caller can see another's tokens. A caller that stops reading
(its client left) cancels its row, which leaves the batch at the next step; a row whose
request is bad (a prompt over the context, an unknown method) fails alone.

Example::

    scheduler = BatchScheduler(generator.model, max_batch=8)
    stream = scheduler.submit(lambda: Row(...))     # built on the scheduler's thread
    for block in stream:                            # Blocks, the last with its stats
        ...
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from .loop import BatchDecoder, Row
from .seam import Block

# prompt tokens a joining row reads per step while others decode: the largest chunk that
# holds a batch of 8 back for at most 4 of its steps, measured on 2 cores with qwen 0.5B in
# float32 (``ragdec bench prefill-chunk``, bench/results/prefill_chunk.json); smaller
# chunks read prompts markedly slower
DEFAULT_PREFILL_CHUNK = 128


class RowStream:
    """The blocks of one submitted row, in order; iterate it from the submitting thread."""

    def __init__(self, make_row: Callable[[], Row]):
        self.make_row = make_row  # called on the scheduler's thread: method state is the scheduler's
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # when the row joined the decoder
        self._blocks: "queue.Queue[object]" = queue.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Leave the batch at the next step (a no-op after the end)."""
        self._cancelled.set()

    def put(self, item) -> None:
        self._blocks.put(item)

    def __iter__(self) -> Iterator[Block]:
        try:
            while True:
                item = self._blocks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()  # the reader stopped early (or finished: then a no-op)


class BatchScheduler:
    """Steps one ``BatchDecoder`` in a thread for all callers.

    Args:
        model: the target causal LM.
        max_batch: rows decoding together; more wait to join.
        prefill_chunk: prompt tokens a joining row reads per step while others decode.
        lock: held around every step, shared with any other loop on the same model.
    """

    def __init__(self, model, max_batch: int = 8, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, lock=None):
        self.lock = lock or threading.RLock()
        self.decoder = BatchDecoder(model, prefill_chunk=prefill_chunk, max_rows=max_batch, lock=self.lock)
        self.max_batch = max_batch
        self.steps = 0
        self.failed_steps = 0
        self.last_error = ""
        self.last_step_at = time.time()
        self._inbox: "queue.Queue[RowStream | None]" = queue.Queue()
        self._streams: dict[int, RowStream] = {}  # id(row) -> its stream
        self._next_key = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ragdec-batch", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def rows(self) -> int:
        """Rows decoding or reading their prompts now."""
        return len(self.decoder)

    def submit(self, make_row: Callable[[], Row]) -> RowStream:
        """Queue a request; ``make_row`` builds its row (drafter, acceptance, stop) on the
        scheduler's thread, and an exception it raises comes back from the stream."""
        if not self.alive:
            raise RuntimeError("the batch scheduler has stopped")
        stream = RowStream(make_row)
        self._inbox.put(stream)
        return stream

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---- the scheduler's thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._admit(block=not self.decoder.busy)
            for key, stream in list(self._streams.items()):
                if stream.cancelled:
                    self.decoder.cancel(key)
            self._forget_cancelled()
            if not self.decoder.busy:
                continue
            try:
                events = self.decoder.step()
            except Exception as error:  # noqa: BLE001 - fail the rows of this batch, keep serving
                self._fail_all(error)
                continue
            self.steps += 1
            self.last_step_at = time.time()
            for row, block in events:
                stream = self._streams.get(row.key)
                if stream is None:
                    continue
                stream.put(block)
                if block.finish_reason is not None:
                    del self._streams[row.key]
        for stream in self._streams.values():
            stream.put(RuntimeError("the batch scheduler stopped"))

    def _admit(self, block: bool) -> None:
        """Take new requests: wait for one when idle, else take what has arrived."""
        while True:
            try:
                stream = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            if stream is None:
                return
            block = False
            if stream.cancelled:
                continue
            try:
                row = stream.make_row()
                row.key = self._next_key
                self.decoder.add(row)
            except Exception as error:  # noqa: BLE001 - a bad request fails alone
                stream.put(error)
                continue
            self._next_key += 1
            stream.started_at = time.perf_counter()
            self._streams[row.key] = stream

    def _forget_cancelled(self) -> None:
        live = {row.key for row in (*self.decoder.rows, *self.decoder.joining) if not row.cancelled}
        for key in [k for k in self._streams if k not in live]:
            del self._streams[key]

    def _fail_all(self, error: Exception) -> None:
        self.failed_steps += 1
        self.last_error = f"{type(error).__name__}: {error}"
        for stream in self._streams.values():
            stream.put(RuntimeError(f"the batched forward failed: {self.last_error}"))
        self._streams.clear()
        model = self.decoder.model
        self.decoder = BatchDecoder(model, self.decoder.prefill_chunk, self.decoder.max_rows, self.lock, self.decoder.rows_kv)
