"""Many users on one server: the same client load against `ragdec serve` once per
``--max-batch`` value, in one invocation.

    ragdec bench server-load --load rag --model qwen2.5-coder-0.5b-instruct \\
        --clients 16 --requests 4 --max-batch 1,8 --json bench/results/server_load_rag.json

Loads (data from ``--data``):

- ``rag``: each client asks its own SQuAD questions (``qa/squad_questions.jsonl``) over a
  store of ``qa/squad_passages.jsonl`` (the default embedder, built once, or ``--store``),
  3 passages a question, the QA cache off;
- ``chat``: each client holds a CoQA conversation (``dialogue/coqa.jsonl``): the story in
  the system message, then ``--requests`` turns, each sending the history with the
  server's own earlier answers (the server keeps the history's KV between turns).

Every request is streamed, so that the time to the first content is measured at the
client. ``max_batch=1`` is one request at a time, as the server ran before batching: its
answers are each request's answer alone, and ``mixed`` counts the answers of every run
that differ from them (greedy decoding gives a request one answer). Per run: answered,
failed, mixed, answers/s and tokens/s over the run's wall time, latency, TTFT and queue
percentiles, the server's peak RSS, and where a request's time went (queue, prefill: from
joining the decoder to the first token, decode, the rest: retrieval and HTTP).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .machine import memory_mb
from .server_load import REQUEST_TIMEOUT_S, delta_text, free_port, percentiles, settled_health, sse_events, start_server
from .workloads import data_dir, read_jsonl

LOADS = ("rag", "chat")
MODEL = "qwen2.5-coder-0.5b-instruct"
MAX_NEW_TOKENS = {"rag": 64, "chat": 32}
CLIENTS, REQUESTS = 16, 4
PASSAGES_K = 3
CHAT_SYSTEM = "Answer the question about this story in a few words.\n\nStory:\n{story}"


def rag_conversations(data: Path, clients: int, requests: int) -> list[list[str]]:
    """Each client's questions: its own ``requests`` SQuAD questions."""
    questions = [r["question"] for r in read_jsonl(data / "qa" / "squad_questions.jsonl")]
    if len(questions) < clients * requests:
        raise ValueError(f"{len(questions)} questions for {clients} clients x {requests} requests")
    return [questions[c * requests : (c + 1) * requests] for c in range(clients)]


def chat_conversations(data: Path, clients: int, requests: int) -> list[tuple[str, list[str]]]:
    """Each client's (story, questions): a CoQA story with at least ``requests`` turns."""
    stories = [s for s in read_jsonl(data / "dialogue" / "coqa.jsonl") if len(s["turns"]) >= requests]
    if len(stories) < clients:
        raise ValueError(f"{len(stories)} CoQA stories with {requests} turns for {clients} clients")
    return [(s["story"], [t["question"] for t in s["turns"][:requests]]) for s in stories[:clients]]


def build_rag_store(data: Path, folder: Path) -> Path:
    """The SQuAD passages in a store (the default embedder)."""
    from ragdec.retrieval.ingest import build

    store = folder / "squad.store"
    build([data / "qa" / "squad_passages.jsonl"], store, progress=True)
    return store


def stream_request(port: int, model: str, messages: list[dict], max_new_tokens: int) -> dict:
    """One streamed request: its text, the client's latency and time to the first content,
    and the server's figures (queue, decoder stats)."""
    import http.client

    body = {"model": model, "messages": messages, "max_tokens": max_new_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"status": response.status, "error": response.read().decode(errors="replace")[:300]}
        texts, first, done, extra, usage = [], None, False, {}, {}
        for event in sse_events(response):
            if event is None:
                done = True
                break
            if "error" in event:
                return {"status": 200, "error": event["error"].get("message", ""), "done": False}
            if text := delta_text(event):
                first = first or time.perf_counter()
                texts.append(text)
            extra = event.get("ragdec", extra)
            usage = event.get("usage") or usage
        return {"status": 200, "text": "".join(texts), "seconds": time.perf_counter() - started,
                "ttft_s": (first or time.perf_counter()) - started, "done": done, "ragdec": extra, "usage": usage}
    except OSError as error:
        return {"status": 0, "error": f"{type(error).__name__}: {error}", "done": False}
    finally:
        connection.close()


def run_load(load: str, port: int, model: str, conversations, max_new_tokens: int) -> tuple[list[dict], float]:
    """Every client in its own thread, its requests one after another; returns each
    request's result (with ``client``, ``turn``) and the wall time."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        history: list[dict] = []
        if load == "chat":
            story, questions = conversations[c]
            history = [{"role": "system", "content": CHAT_SYSTEM.format(story=story)}]
        else:
            questions = conversations[c]
        for turn, question in enumerate(questions):
            messages = (history if load == "chat" else []) + [{"role": "user", "content": question}]
            result = stream_request(port, model, messages, max_new_tokens)
            result.update(client=c, turn=turn)
            with lock:
                results.append(result)
            if load == "chat":
                answer = result.get("text", "") if result.get("done") else ""
                history = messages + [{"role": "assistant", "content": answer}]

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def summarize(results: list[dict], wall: float, reference: dict | None) -> dict:
    answered = [r for r in results if r["status"] == 200 and r.get("done")]
    failed = [r for r in results if not (r["status"] == 200 and r.get("done"))]
    mixed = [r for r in answered if reference is not None and r["text"] != reference.get((r["client"], r["turn"]))]
    tokens = sum(r["usage"].get("completion_tokens", 0) for r in answered)
    stats = [r["ragdec"].get("stats") or {} for r in answered]
    queue = [r["ragdec"].get("queue_s", 0.0) for r in answered]
    prefill = [s.get("prefill_seconds", 0.0) for s in stats]
    decode = [s.get("decode_seconds", 0.0) for s in stats]
    latency = [r["seconds"] for r in answered]
    other = [max(0.0, t - q - p - d) for t, q, p, d in zip(latency, queue, prefill, decode)]

    def mean(values):
        return round(statistics.fmean(values), 3) if values else 0.0

    def p50_p95(values):
        shown = percentiles(values)
        return {"p50": shown.get("p50"), "p95": shown.get("p95")} if shown else {}

    return {
        "requests": len(results),
        "answered": len(answered),
        "failed": len(failed),
        "mixed": len(mixed),
        "wall_s": round(wall, 2),
        "answers_per_s": round(len(answered) / wall, 3) if wall else 0.0,
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "mean_new_tokens": round(tokens / len(answered), 1) if answered else 0.0,
        "mean_prompt_tokens": mean([s.get("prompt_tokens", 0) for s in stats]),
        "mean_reused_prompt_tokens": mean([s.get("reused_prompt_tokens", 0) for s in stats]),
        "latency_s": p50_p95(latency),
        "ttft_s": p50_p95([r["ttft_s"] for r in answered]),
        "queue_s": p50_p95(queue),
        "time_split_mean_s": {"queue": mean(queue), "prefill": mean(prefill), "decode": mean(decode), "other": mean(other)},
        "examples_of_failures": [r.get("error", "") for r in failed[:3]],
        "examples_of_mixed": [{"client": r["client"], "turn": r["turn"], "got": r["text"][:200],
                               "alone": reference.get((r["client"], r["turn"]), "")[:200]} for r in mixed[:3]],
    }


def run_server_batch(
    json_path: str | None,
    load: str,
    data: str | None = None,
    model: str | None = None,
    store: str | None = None,
    clients: int = CLIENTS,
    requests_per_client: int = REQUESTS,
    max_batch: tuple[int, ...] = (1, 8),
    max_new_tokens: int | None = None,
) -> dict:
    """Run ``load`` once per ``max_batch`` value (1 first: its answers are the reference);
    write ``{"runs": {"max_batch=N": {...}}}`` to ``json_path``."""
    from .harness import write_json
    from .machine import machine_info

    if load not in LOADS:
        raise ValueError(f"unknown load {load!r}; loads: {', '.join(LOADS)} (or leave --load out for the smollm2 load)")
    model = model or MODEL
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[load]
    root = data_dir(data)
    conversations = (rag_conversations if load == "rag" else chat_conversations)(root, clients, requests_per_client)
    batches = sorted(set(max_batch))
    runs: dict[str, dict] = {}
    reference: dict | None = None
    with tempfile.TemporaryDirectory() as scratch:
        serve_args: list[str] = ["--no-cache", "--max-new-tokens", str(max_new_tokens)]
        if load == "rag":
            folder = Path(store).expanduser() if store else build_rag_store(root, Path(scratch))
            serve_args += ["--store", str(folder), "-k", str(PASSAGES_K)]
        for batch in batches:
            port = free_port()
            server = start_server(port, model, serve_args + ["--max-batch", str(batch), "--max-queue", "0"])
            try:
                # warm-up: one request alone (loads the cost curve, the kernels, the retriever)
                warm = conversations[0][0] if load == "rag" else conversations[0][1][0]
                stream_request(port, model, [{"role": "user", "content": warm}], 8)
                health_before = settled_health(port, expected_jobs=1)
                print(f"[server-load {load}] max_batch={batch}: {clients} clients x {requests_per_client} requests", file=sys.stderr)
                results, wall = run_load(load, port, model, conversations, max_new_tokens)
                settled_health(port, expected_jobs=1 + len(results))
                rss = memory_mb(server.pid, "VmHWM")
            finally:
                server.terminate()
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
            if reference is None:  # max_batch=1: one request at a time, each answered alone
                reference = {(r["client"], r["turn"]): r.get("text", "") for r in results if r.get("done")}
            run = summarize(results, wall, reference)
            run["peak_rss_mb"] = rss
            run["warmup_jobs"] = sum(health_before["jobs"].values())
            runs[f"max_batch={batch}"] = run
            print(f"  {run['answered']}/{run['requests']} answered, {run['mixed']} mixed, {run['failed']} failed; "
                  f"{run['answers_per_s']} answers/s, latency p95 {run['latency_s'].get('p95')} s", file=sys.stderr)
    first, last = runs[f"max_batch={batches[0]}"], runs[f"max_batch={batches[-1]}"]
    result = {
        "workload": f"server-load-{load}",
        "description": __doc__.split("\n\n")[0],
        "config": {"model": model, "load": load, "clients": clients, "requests_per_client": requests_per_client,
                   "max_new_tokens": max_new_tokens, "passages_per_question": PASSAGES_K if load == "rag" else None,
                   "qa_cache": "off", "stream": "every request", "max_batch": batches,
                   "reference": f"answers of max_batch={batches[0]} (one request at a time)"},
        "runs": runs,
        "ratios": {
            "answers_per_s": round(last["answers_per_s"] / first["answers_per_s"], 3) if first["answers_per_s"] else None,
            "latency_p95": round(last["latency_s"]["p95"] / first["latency_s"]["p95"], 3) if first["latency_s"] else None,
            "compared": f"max_batch={batches[-1]} / max_batch={batches[0]}",
        },
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    return result
