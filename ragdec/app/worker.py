"""The server's queue to its model: one job at a time, in arrival order, in a thread.

A model answers one decode at a time (its kept-prefix store and the CPU's cores are
shared by every request), and an asyncio server must not block its event loop on a
forward pass. So every piece of model work (an answer, a retrieval) becomes a ``Job``: the
event loop submits it, the worker thread runs it to the end, and each item it yields
(a pipeline ``Chunk``) crosses back to the loop on the job's own queue, so no request's
chunks can reach another's. A job whose client went away is cancelled: the worker stops
it before its next item (the decode loop is closed between two forward passes) and moves
on to the next job.

Example (inside a coroutine)::

    worker = ModelWorker()
    job = worker.submit(lambda: pipeline.stream([request]))
    async for chunk in job.items():
        ...
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable, Iterable

_END = object()  # after a job's last item


class JobFailed(Exception):
    """The job's work raised; ``__cause__`` is what it raised."""


class Job:
    """One piece of model work and the queue its items come back on."""

    def __init__(self, work: Callable[[], Iterable[Any]], loop: asyncio.AbstractEventLoop):
        self.work = work  # called in the worker thread; returns the items (a generator streams them)
        self.loop = loop
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # when the worker took it
        self.completed = False  # the consumer has what it wanted (set by it or at the end): cancel is a no-op
        self._items: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def queue_seconds(self) -> float:
        """Time spent waiting for the model."""
        return (self.started_at or time.perf_counter()) - self.submitted_at

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the work before its next item (a no-op once the consumer saw the end)."""
        if not self.completed:
            self._cancelled.set()

    def put(self, item: Any) -> None:
        """Hand ``item`` to the consumer (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone
            self._cancelled.set()

    async def items(self) -> AsyncIterator[Any]:
        """The work's items as the worker produces them.

        Raises:
            JobFailed: the work raised (chained to its exception).
        """
        while True:
            item = await self._items.get()
            if item is _END:
                self.completed = True
                return
            if isinstance(item, JobFailed):
                self.completed = True
                raise item
            yield item


class ModelWorker:
    """Runs jobs one after another in its own thread.

    ``counts`` says what became of the jobs: "done", "cancelled" (the client left before
    the end), "failed" (the work raised).
    """

    def __init__(self, name: str = "ragdec-model"):
        self._jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.counts: Counter = Counter()
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        return self._jobs.qsize()

    def submit(self, work: Callable[[], Iterable[Any]]) -> Job:
        """Queue ``work``; call from the event loop that will read the job's items."""
        job = Job(work, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the running job, then stop (jobs still waiting are dropped)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.put(_END)
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.running = job
            outcome = self._run_job(job)
            self.counts[outcome] += 1  # counted before the consumer hears the end
            self.running = None
            job.put(_END)

    @staticmethod
    def _run_job(job: Job) -> str:
        """Run ``job`` to its end or its cancellation: "done", "cancelled" or "failed"."""
        job.started_at = time.perf_counter()
        if job.cancelled:
            return "cancelled"
        items = None
        try:
            items = iter(job.work())
            for item in items:
                job.put(item)
                if job.cancelled:
                    return "cancelled"
            return "done"
        except Exception as error:  # noqa: BLE001 - the consumer gets it, the worker goes on
            failure = JobFailed(f"{type(error).__name__}: {error}")
            failure.__cause__ = error
            job.put(failure)
            return "failed"
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator cut short runs its cleanup (the decode loop stops here)
