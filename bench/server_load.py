"""Load test of `ragdec serve` on the loopback address: concurrent clients, every answer
checked to be its own question's.

    ragdec bench server-load --json bench/results/server_load.json

What runs: a store of 14 SQuAD paragraphs (all-minilm-l6-v2), `ragdec serve` over it in a
subprocess on a free 127.0.0.1 port (smollm2-135m-instruct, 2 passages per question, QA
cache off, short answers), then:

1. references: each of the 20 questions asked once, one at a time;
2. load: 20 client threads, each asking its own question 10 times, streamed and not in
   turn (200 requests, at most 20 in the server's queue at once).

Greedy decoding gives a question the same answer every time, so an answer that differs
from its question's reference was mixed with another request (or lost a piece). Latency
is measured by the clients: request sent to last byte (and to the first content event
when streamed). Bounded: a fixed number of requests, each with a timeout, loopback only.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ragdec.files import read_jsonl
from ragdec.pipelines.remote import delta_text, sse_events  # one SSE reader: the remote engine's (server_batch imports it from here)

MODEL = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 16
CLIENTS = 20
REQUESTS_PER_CLIENT = 10
TEMPLATES = ("What is {}?", "Tell me one fact about {}.", "Why is {} important?")
REQUEST_TIMEOUT_S = 300


def questions(count: int) -> list[str]:
    """``count`` distinct questions about the sample corpus's articles."""
    from ragdec.data import sample_corpus_path

    titles = list(dict.fromkeys(record["title"] for record in read_jsonl(sample_corpus_path())))
    pool = [template.format(title) for template in TEMPLATES for title in titles]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} distinct questions for {count} clients")
    return pool[:count]


def build_store(folder: Path) -> Path:
    """The first two paragraphs of each sample article, embedded with all-minilm-l6-v2."""
    from ragdec.data import sample_corpus_path
    from ragdec.retrieval.embedder import Embedder
    from ragdec.retrieval.ingest import build

    counts: dict[str, int] = {}
    records = []
    for record in read_jsonl(sample_corpus_path()):
        if counts.get(record["title"], 0) < 2:
            counts[record["title"]] = counts.get(record["title"], 0) + 1
            records.append(json.dumps(record, ensure_ascii=False) + "\n")
    source = folder / "sample.jsonl"
    source.write_text("".join(records), encoding="utf-8")
    build([source], folder / "docs.store", embedder=Embedder("all-minilm-l6-v2"), progress=False)
    return folder / "docs.store"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, model: str | None, serve_args: list[str]) -> subprocess.Popen:
    """`ragdec serve --model MODEL *serve_args` on 127.0.0.1:``port``, once /health answers
    (no --model when ``model`` is None: a remote engine's front, say)."""
    command = [sys.executable, "-m", "ragdec.app.cli", "serve", *(["--model", model] if model else []), "--port", str(port),
               "--log-level", "warning", *serve_args]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"ragdec serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("ragdec serve did not answer /health within 300 s")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server of ``start_server``: asked to end, killed after 30 s."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def ask(port: int, model: str, question: str, stream: bool, max_new_tokens: int) -> dict:
    """One request: status, text, id, latency (and time to the first content when streamed)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_new_tokens, "stream": stream}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"status": response.status, "error": response.read().decode(errors="replace")[:300]}
        if not stream:
            answer = json.loads(response.read())
            return {"status": 200, "text": answer["choices"][0]["message"]["content"], "ids": {answer["id"]},
                    "seconds": time.perf_counter() - started, "queue_s": answer["ragdec"]["queue_s"], "done": True}
        texts, ids, first, done, queue_s = [], set(), None, False, None
        for event in sse_events(response):
            if event is None:
                done = True
                break
            ids.add(event.get("id"))
            if text := delta_text(event):
                first = first or time.perf_counter()
                texts.append(text)
            if "ragdec" in event:
                queue_s = event["ragdec"]["queue_s"]
        return {"status": 200, "text": "".join(texts), "ids": ids, "seconds": time.perf_counter() - started,
                "first_s": (first or time.perf_counter()) - started, "queue_s": queue_s, "done": done}
    except OSError as error:
        return {"status": 0, "error": f"{type(error).__name__}: {error}"}
    finally:
        connection.close()


def settled_health(port: int, expected_jobs: int, wait_s: float = 30.0) -> dict:
    """/health once the server has counted every job (a streamed answer's [DONE] comes
    before its job ends), or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        connection.close()
        if sum(health["jobs"].values()) >= expected_jobs or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3)}


def run_server_load(json_path: str | None, model: str | None = None, max_new_tokens: int | None = None,
                    clients: int = CLIENTS, requests_per_client: int = REQUESTS_PER_CLIENT) -> dict:
    """Run the load test; write the result to ``json_path``; ``result["ok"]``: every request
    answered with its own question's answer."""
    from .harness import write_json
    from .machine import machine_info

    model = model or MODEL
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
    asked = questions(clients)
    with tempfile.TemporaryDirectory() as scratch:
        store = build_store(Path(scratch))
        port = free_port()
        server = start_server(port, model, ["--store", str(store), "--no-cache", "-k", "2", "--max-new-tokens", str(max_new_tokens)])
        try:
            # 1. references, one at a time
            print(f"references: {len(asked)} questions, one at a time", file=sys.stderr)
            reference = {}
            for question in asked:
                answer = ask(port, model, question, False, max_new_tokens)
                if answer["status"] != 200:
                    raise RuntimeError(f"reference request failed: {answer}")
                reference[question] = answer["text"]
            # 2. load: each client asks its own question, streamed and not in turn
            print(f"load: {clients} clients x {requests_per_client} requests", file=sys.stderr)
            results: list[tuple[str, bool, dict]] = []
            lock = threading.Lock()

            def client(question: str) -> None:
                for i in range(requests_per_client):
                    stream = i % 2 == 1
                    answer = ask(port, model, question, stream, max_new_tokens)
                    with lock:
                        results.append((question, stream, answer))

            started = time.perf_counter()
            threads = [threading.Thread(target=client, args=(q,)) for q in asked]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            health = settled_health(port, expected_jobs=len(asked) + len(results))
        finally:
            stop_server(server)

    answered = [r for r in results if r[2]["status"] == 200 and r[2]["done"]]
    mixed = [(q, r["text"]) for q, _, r in answered if r["text"] != reference[q]]
    ids = [i for _, _, r in answered for i in r["ids"]]
    failures = [r for _, _, r in results if r["status"] != 200 or not r.get("done")]
    result = {
        "workload": "server-load",
        "ok": len(answered) == len(results) and not mixed,
        "description": "ragdec serve on 127.0.0.1: concurrent clients, each asking its own question; greedy answers "
                       "compared with each question's answer asked alone",
        "config": {"model": model, "max_new_tokens": max_new_tokens, "clients": clients,
                   "requests_per_client": requests_per_client, "passages_per_question": 2, "qa_cache": "off",
                   "stream": "every second request of each client"},
        "requests": len(results),
        "answered": len(answered),
        "failed": len(failures),
        "mixed": len(mixed),
        "unique_ids": len(set(ids)) == len(answered),
        "wall_seconds": round(wall, 2),
        "requests_per_s": round(len(answered) / wall, 2) if wall else 0.0,
        "latency_s": percentiles([r["seconds"] for _, _, r in answered]),
        "latency_s_streamed": percentiles([r["seconds"] for _, s, r in answered if s]),
        "first_content_s_streamed": percentiles([r["first_s"] for _, s, r in answered if s]),
        "queue_s": percentiles([r["queue_s"] for _, _, r in answered if r.get("queue_s") is not None]),
        "server_jobs": health["jobs"],
        "examples_of_failures": [r.get("error", "") for r in failures[:3]],
        "examples_of_mixed": mixed[:3],
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(f"{result['answered']}/{result['requests']} answered, {result['mixed']} mixed, {result['failed']} failed; "
          f"latency p50 {result['latency_s'].get('p50')} s, p95 {result['latency_s'].get('p95')} s; "
          f"{result['requests_per_s']} requests/s over {result['wall_seconds']} s", file=sys.stderr)
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    if not result["ok"]:
        print("ragdec: the load test found lost or mixed answers: see examples_of_failures and examples_of_mixed", file=sys.stderr)
    return result
