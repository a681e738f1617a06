"""The server's queue to its model: jobs in arrival order, run by a few threads.

An asyncio server must not block its event loop on a forward pass. So every piece of
model work (an answer, a retrieval) becomes a ``Job``: the event loop submits it, a worker
thread runs it to the end, and each item it yields (a pipeline ``Chunk``) crosses back to
the loop on the job's own queue, so no request's chunks can reach another's.

With one thread, jobs run one at a time. With ``threads`` = the batch size, that many
requests run their pipelines at once (cache lookup, retrieval, the prompt) and their
decodes meet in the engine's batch (``Engine.start_batching``), which decodes them
together. A job whose client went away is cancelled: the worker stops it before its next
item (the decode loop drops its row between two forward passes). The queue is bounded:
past ``max_queue`` waiting jobs, ``submit`` refuses (the server answers 429), and a job
that waited and ran past its deadline ends with ``JobExpired``.

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

# requests decoding together by default (``ragdec serve --max-batch``): on 2 cores a step
# over 8 rows costs a fraction of 8 single steps (bench/results/server_load_*.json)
DEFAULT_MAX_BATCH = 8
# requests waiting at most: eight full batches of the default size; past it a client is told to
# come back later (429) rather than wait on (bench/results/server_load.json: the queue times)
DEFAULT_MAX_QUEUE = 64


class JobFailed(Exception):
    """The job's work raised; ``__cause__`` is what it raised."""


class JobExpired(Exception):
    """The job waited and ran longer than its deadline; it was cancelled."""


class QueueFull(Exception):
    """``max_queue`` jobs are already waiting; ``retry_after`` is a fair guess in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.retry_after = retry_after


class Job:
    """One piece of model work and the queue its items come back on."""

    def __init__(self, work: Callable[[], Iterable[Any]], loop: asyncio.AbstractEventLoop, deadline_s: float | None = None):
        self.work = work  # called in the worker thread; returns the items (a generator streams them)
        self.loop = loop
        self.deadline_s = deadline_s  # from submission to the last item; None: no limit
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
            JobExpired: the deadline passed first (the job is cancelled).
        """
        while True:
            if self.deadline_s is None:
                item = await self._items.get()
            else:
                left = self.deadline_s - (time.perf_counter() - self.submitted_at)
                try:
                    item = await asyncio.wait_for(self._items.get(), timeout=max(left, 0.0))
                except asyncio.TimeoutError:
                    self.cancel()
                    self.completed = True
                    raise JobExpired(f"no answer within {self.deadline_s:g} s") from None
            if item is _END:
                self.completed = True
                return
            if isinstance(item, JobFailed):
                self.completed = True
                raise item
            yield item


class ModelWorker:
    """Runs jobs in arrival order on ``threads`` threads.

    ``counts`` says what became of the jobs: "done", "cancelled" (the client left before
    the end), "failed" (the work raised), "refused" (the queue was full). A thread never
    dies of a job: anything a job raises fails that job alone, and ``live`` turns false
    only if a thread is gone, which /health reports.

    Args:
        threads: jobs running at once (1: one at a time).
        max_queue: jobs waiting at most; past it ``submit`` raises ``QueueFull``.
        deadline_s: a job's limit from submission to its last item (None: none).
    """

    def __init__(self, name: str = "ragdec-model", threads: int = 1, max_queue: int | None = None, deadline_s: float | None = None):
        self._jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.counts: Counter = Counter()
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self._running: set[Job] = set()
        self._lock = threading.Lock()
        self._recent_seconds = 0.0  # how long the last job took, for Retry-After
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        return self._jobs.qsize()

    @property
    def running(self) -> int:
        """Jobs started and not yet ended."""
        return len(self._running)

    @property
    def threads(self) -> int:
        return len(self._threads)

    @property
    def live(self) -> bool:
        """Every worker thread is running."""
        return all(thread.is_alive() for thread in self._threads)

    def submit(self, work: Callable[[], Iterable[Any]]) -> Job:
        """Queue ``work``; call from the event loop that will read the job's items.

        Raises:
            QueueFull: ``max_queue`` jobs are already waiting.
        """
        waiting = self.waiting
        if self.max_queue is not None and waiting >= self.max_queue:
            self.counts["refused"] += 1
            raise QueueFull(waiting, retry_after=self._retry_after(waiting))
        job = Job(work, asyncio.get_running_loop(), self.deadline_s)
        self._jobs.put(job)
        return job

    def _retry_after(self, waiting: int) -> int:
        """Seconds until a place is likely free: the queue's length in recent job times."""
        recent = self._recent_seconds or 1.0
        return max(1, round(recent * (waiting + 1) / max(1, self.threads)))

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
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._running.add(job)
            try:
                outcome = self._run_job(job)
            except BaseException as error:  # noqa: BLE001 - even a job's cleanup failing ends that job alone
                outcome = "failed"
                job.put(JobFailed(f"{type(error).__name__}: {error}"))
            self.counts[outcome] += 1  # counted before the consumer hears the end
            self._recent_seconds = time.perf_counter() - (job.started_at or job.submitted_at)
            with self._lock:
                self._running.discard(job)
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
