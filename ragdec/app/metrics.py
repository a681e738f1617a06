"""Prometheus metrics of `ragdec serve`: GET /metrics in Prometheus' text format.

The names follow vLLM's, the convention dashboards already know, under a ``ragdec:``
prefix (``ragdec:time_to_first_token_seconds``, ``ragdec:num_requests_running``, ...), plus
what only ragdec has: the QA cache's outcomes, prompt tokens whose KV was reused, and the
drafts of each decoding method.

Every server has its own registry (tests start several in one process), and the gauges
of the queue are read from the worker when Prometheus scrapes, never kept in step by hand.

Example::

    metrics = ServerMetrics(worker)
    metrics.observe_answer(chunk, queue_s=0.1, ttft_s=0.4, e2e_s=1.2)   # a request's last chunk
    body, content_type = metrics.render()
"""

from __future__ import annotations

from typing import Callable

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("the server's /metrics needs prometheus_client: pip install prometheus-client==0.26.0") from error

PREFIX = "ragdec:"
# A CPU answers in seconds, not milliseconds: buckets from a fast cached answer to a long
# answer waiting behind a full batch.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# One token on 2 cores takes tens of milliseconds; a verify of a long draft, more.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CACHE_OUTCOMES = ("exact", "semantic", "near", "miss", "off")
FINISH_REASONS = ("stop", "length", "error", "abort")


class ServerMetrics:
    """The server's metrics, in a registry of its own.

    Args:
        running: how many requests are being answered now (read at each scrape).
        waiting: how many wait in the queue now (read at each scrape).
    """

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name, doc, buckets=SECONDS_BUCKETS):
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        Gauge(PREFIX + "num_requests_running", "Requests being answered now.",
              registry=self.registry).set_function(running)
        Gauge(PREFIX + "num_requests_waiting", "Requests waiting in the queue.",
              registry=self.registry).set_function(waiting)
        self.ttft = histogram("time_to_first_token_seconds", "From a request's arrival to its first text.")
        self.itl = histogram("inter_token_latency_seconds", "Decode time per new token after the first.", TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From a request's arrival to its last text.")
        self.queue = histogram("request_queue_time_seconds", "Time a request waited in the queue.")
        self.prefill = histogram("request_prefill_time_seconds", "Time reading a request's prompt (decoded answers).")
        self.decode = histogram("request_decode_time_seconds", "Time decoding after the first token (decoded answers).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of decoded answers.")
        self.generation_tokens = counter("generation_tokens", "New tokens of decoded answers.")
        self.reused_tokens = counter("prefix_cache_hits", "Prompt tokens whose KV came from a kept prefix.")
        self.queried_tokens = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix KV cache.")
        self.success = counter("request_success", "Requests that ended, by finish reason.", ("finished_reason",))
        self.failures = counter("request_failure", "Requests refused or failed, by HTTP status.", ("status",))
        self.cache = counter("qa_cache_requests", "What the QA cache made of each request.", ("outcome",))
        self.drafts = counter("spec_decode_num_drafts", "Verify forwards of answers that drafted, by method.", ("method",))
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens sent to verification, by method.",
                                    ("method",))
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens that stood, by method.",
                                       ("method",))
        for reason in FINISH_REASONS:  # every series exists from the start, so rates begin at zero
            self.success.labels(reason)
        for outcome in CACHE_OUTCOMES:
            self.cache.labels(outcome)

    def observe_answer(self, last, queue_s: float, ttft_s: float | None, e2e_s: float) -> None:
        """Count one request from its last chunk (``pipelines.types.Chunk``)."""
        self.queue.observe(queue_s)
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.success.labels(last.finish_reason or "stop").inc()
        info, stats = last.info, last.stats
        if info is not None:
            self.cache.labels(info.cache if info.cache in CACHE_OUTCOMES else "off").inc()
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.queried_tokens.inc(stats.prompt_tokens)
        self.reused_tokens.inc(stats.reused_prompt_tokens)
        self.prefill.observe(stats.prefill_seconds)
        self.decode.observe(max(0.0, stats.decode_seconds))
        if stats.new_tokens > 1 and stats.decode_seconds > 0:
            per_token = stats.decode_seconds / (stats.new_tokens - 1)
            for _ in range(stats.new_tokens - 1):  # one observation per token, as vLLM counts
                self.itl.observe(per_token)
        method = info.method if info is not None else "unknown"
        if stats.drafted_tokens:
            # each decode-phase forward verifies one draft (an empty one counts too)
            self.drafts.labels(method).inc(max(0, stats.forward_passes - 1))
            self.draft_tokens.labels(method).inc(stats.drafted_tokens)
            self.accepted_tokens.labels(method).inc(stats.accepted_tokens)

    def observe_refusal(self, status: int) -> None:
        """A request that got no answer: a 4xx the client can fix, or a 5xx."""
        self.failures.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
