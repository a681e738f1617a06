"""Answer quality and speed through the pipeline: `ragdec bench qa` and `ragdec bench chat-pipeline`.

qa: every SQuAD question of ../shared/data/qa is answered over a store of all 995
paragraphs (retrieval included): exact match and token F1 against the SQuAD answers (the
official normalization), the share of questions whose gold paragraph was retrieved, and
end-to-end speed per method. Methods are forced (greedy, llma, ...) so they answer the
same prompts; they alternate per question, in turn order rotated, after a warm-up.

chat-pipeline: CoQA stories, the story as the system message, the first turns asked one
after another through ``ChatSession`` with the method's own answers as history: F1 per
turn against CoQA's answers, and speed. Methods alternate per conversation; each starts
with no kept prefixes, so both prefill the same parts.

Speeds: ``tokens_per_s`` is new tokens over the request's whole time (retrieval, prompt,
prefill, decode: what a user waits), median over questions; ``decode_tokens_per_s`` is the
decode phase alone (as in the decoding benchmarks).

qa through a remote engine (``--engine``): ``openai`` asks the questions through the
OpenAI-compatible server at ``--base-url`` (retrieval and prompts here, the model there),
and with ``--methods`` those methods of ``--model`` in process beside it, alternating per
question over the same retrieval, the first the reference: llama.cpp's greedy served by
llama-server against ragdec's greedy and llma on the same GGUF, ``identical_to_greedy``
telling how often the server's answer is ragdec's greedy's (llama-cpp-python's server at
temperature 0 still penalizes repeats by default: tests/llamacpp_server.py);
``loopback`` measures what the remote path costs: `ragdec serve` of the same model on
127.0.0.1 (one request at a time, the same method), and each question answered in process
and through it, alternating, over the same retrieval here; ``remote_overhead`` has the
medians of both end-to-end times, of their ratio per question, and of the difference.
"""

from __future__ import annotations

import collections
import contextlib
import re
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .workloads import data_dir, read_jsonl

QA_METHODS = ("greedy", "llma")
QA_ENGINES = ("local", "openai", "loopback")  # see the module's docstring
CHAT_TURNS = 5  # questions asked per CoQA story


# ---- SQuAD's answer metrics (as in the official evaluation script) -----------------------


def normalize_answer(text: str) -> str:
    """Lower case; drop punctuation, articles and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def best_over(metric, prediction: str, truths: Sequence[str]) -> float:
    return max((metric(prediction, t) for t in truths), default=0.0)


def strip_citations(text: str) -> str:
    """Answers cite passages as [1]; the citation marks are not part of the answer."""
    return re.sub(r"\s*\[\d+(?:,\s*\d+)*\]", "", text)


# ---- running ---------------------------------------------------------------------------


def _run_request(pipeline, request):
    """Answer one request; (text, last chunk, seconds)."""
    texts = []
    start = time.perf_counter()
    for chunk in pipeline.stream([request]):
        texts.append(chunk.text)
    seconds = time.perf_counter() - start
    if chunk.finish_reason == "error":
        raise RuntimeError(f"the pipeline failed: {chunk.info.error}")
    return "".join(texts), chunk, seconds


def _row(text: str, chunk, seconds: float) -> dict:
    stats = chunk.stats
    return {
        "text": text,
        "token_ids": None,
        "new_tokens": stats.new_tokens,
        "seconds": seconds,
        "ttft_s": chunk.info.ttft_s,
        "tokens_per_s": stats.new_tokens / seconds,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "tokens_per_forward": stats.tokens_per_forward,
        "copied_share": stats.copied_share,
        "prompt_tokens": stats.prompt_tokens,
        "retrieval_s": chunk.info.retrieval_s,
    }


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _summary(rows_by_method: dict[str, list[dict]], reference: str, quality) -> dict:
    """Per method: medians of speed, ratios to ``reference`` per item then the median,
    identical share, and the quality figures ``quality(rows)`` gives."""
    out = {}
    ref_rows = rows_by_method[reference]
    for method, rows in rows_by_method.items():
        entry = {
            **quality(rows),
            "tokens_per_s": _median(r["tokens_per_s"] for r in rows),
            "decode_tokens_per_s": _median(r["decode_tokens_per_s"] for r in rows),
            "ttft_s": _median(r["ttft_s"] for r in rows),
            "mean_tokens_per_forward": round(statistics.mean(r["tokens_per_forward"] for r in rows), 3),
            "mean_copied_share": round(statistics.mean(r["copied_share"] for r in rows), 3),
            "mean_new_tokens": round(statistics.mean(r["new_tokens"] for r in rows), 2),
            "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows), 1),
            "answers": len(rows),
        }
        suffix = reference.replace("-", "_")
        entry[f"speedup_vs_{suffix}"] = _median(r["tokens_per_s"] / ref["tokens_per_s"] for r, ref in zip(rows, ref_rows))
        entry[f"decode_speedup_vs_{suffix}"] = _median(
            r["decode_tokens_per_s"] / ref["decode_tokens_per_s"] for r, ref in zip(rows, ref_rows) if ref["decode_tokens_per_s"]
        )
        entry[f"aggregate_speedup_vs_{suffix}"] = round(
            sum(r["new_tokens"] for r in rows) / sum(r["seconds"] for r in rows)
            / (sum(r["new_tokens"] for r in ref_rows) / sum(r["seconds"] for r in ref_rows)), 4
        )
        entry[f"identical_to_{suffix}"] = round(sum(r["text"] == ref["text"] for r, ref in zip(rows, ref_rows)) / len(rows), 4)
        out[method] = entry
    return out


def _methods(methods: Sequence[str] | None) -> list[tuple[str, str, dict]]:
    """(label, method name, options) from specs such as "llma:copy_k=8"."""
    from .harness import parse_method

    out = []
    for spec in methods or QA_METHODS:
        name, options = parse_method(spec)
        if name.startswith("hf-"):
            raise ValueError(f"{spec}: the pipeline benchmarks run ragdec's methods (greedy, llma, ...), not {name}")
        out.append((spec, name, options))
    return out


def _qa_store(data: Path, folder: Path):
    """A store of all the SQuAD paragraphs, built (or brought up to date) in ``folder``."""
    from ragdec.retrieval.ingest import build

    build([data / "qa" / "squad_passages.jsonl"], folder, progress=True)
    from ragdec.retrieval.retriever import Retriever

    return Retriever.open(folder)


def run_qa_bench(data: str | None, json_path: str | None, *, model: str, methods=None, limit: int | None = None,
                 max_new_tokens: int = 128, k: int = 5, store: str | None = None, engine: str = "local",
                 base_url: str | None = None, remote_model: str | None = None, progress: bool = True,
                 dtype: str | None = None) -> dict:
    """Measure `qa` (see the module's docstring); write JSON to ``json_path`` unless None.

    Args:
        dtype: the local model's weights (``Generator.load``; None: float32).
        engine: "local" (``methods`` in process), "openai" (through the server at
            ``base_url`` answering with ``remote_model``, ``model``'s tokenizer measuring the
            prompts; ``methods`` given, they run in process on ``model`` beside it) or
            "loopback" (one method in process and through `ragdec serve` of ``model`` on
            127.0.0.1, alternating).
    """
    from tqdm import tqdm

    from ragdec.decoding.generator import configure_threads
    from ragdec.decoding.methods import GenerationParams
    from ragdec.pipelines.rag import RagSettings
    from ragdec.pipelines.types import Request

    from .harness import write_json
    from .machine import machine_info

    if engine not in QA_ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(QA_ENGINES)}")
    configure_threads()
    root = data_dir(data)
    questions = read_jsonl(root / "qa" / "squad_questions.jsonl")[: limit or None]
    specs = _methods(methods)
    if not methods and engine != "local":  # loopback compares one method; openai without --methods: the server alone
        specs = specs[:1] if engine == "loopback" else []
    with tempfile.TemporaryDirectory(prefix="ragdec-bench-qa-") as tmp, contextlib.ExitStack() as stack:
        retriever = _qa_store(root, Path(store) if store else Path(tmp) / "squad")
        stack.callback(retriever.close)
        runs = _qa_runs(engine, specs, model, retriever, RagSettings(k=k), base_url, remote_model, stack, dtype)
        if retriever.documents is None:  # a Qdrant store opened from its manifest alone
            raise ValueError(f"bench qa reads which passage is whose from the store's documents file, which {store} lacks: "
                             "pass the folder the store was built in, or leave --store out")
        records = {pid: p.record for pid, p in retriever.documents.get(retriever.documents.all_ids()).items()}

        def ask(question: str, pipeline, name: str, options: dict):
            params = GenerationParams(max_new_tokens=max_new_tokens, method=name, options=options)
            return _run_request(pipeline, Request([{"role": "user", "content": question}], params=params))

        for _, pipeline, name, options in runs:  # warm-up: thread pools, the kept system prompt, cost model, connections
            ask(questions[0]["question"], pipeline, name, options)
        rows: dict[str, list[dict]] = {label: [] for label, _, _, _ in runs}
        items = tqdm(enumerate(questions), total=len(questions), desc="bench qa", unit="question", disable=not progress)
        for i, q in items:
            order = runs[i % len(runs):] + runs[: i % len(runs)]
            for label, pipeline, name, options in order:
                text, chunk, seconds = ask(q["question"], pipeline, name, options)
                row = _row(text, chunk, seconds)
                answer = strip_citations(text)
                row["f1"] = best_over(f1_score, answer, q["answers"])
                row["exact_match"] = best_over(exact_match, answer, q["answers"])
                row["contains_answer"] = float(any(normalize_answer(a) in normalize_answer(answer) for a in q["answers"]))
                row["retrieved_gold"] = float(any(records.get(s.id) == q["passage_id"] for s in chunk.info.sources))
                rows[label].append(row)

    def quality(method_rows):
        return {
            "exact_match": round(statistics.mean(r["exact_match"] for r in method_rows), 4),
            "f1": round(statistics.mean(r["f1"] for r in method_rows), 4),
            "answer_contained": round(statistics.mean(r["contains_answer"] for r in method_rows), 4),
            "retrieval_hit_rate": round(statistics.mean(r["retrieved_gold"] for r in method_rows), 4),
        }

    reference = runs[0][0]
    result = {
        "workload": "qa",
        "machine": machine_info(),
        "settings": {"model": model, "dtype": dtype or "float32", "methods": list(rows), "reference": reference, "questions": len(questions),
                     "max_new_tokens": max_new_tokens, "k": k, "retrieval": "dense, multilingual-e5-small, flat index",
                     "speed": "tokens_per_s: new tokens / whole request time (retrieval, prompt, prefill, decode), median",
                     "engine": engine, **({"base_url": base_url, "remote_model": remote_model} if engine == "openai" else {})},
        "methods": _summary(rows, reference, quality),
        "examples": [{"question": q["question"], "answers": q["answers"], "answer": rows[reference][i]["text"]} for i, q in enumerate(questions[:5])],
    }
    if engine == "loopback":
        result["remote_overhead"] = remote_overhead(rows["in-process"], rows["remote"], runs[0][2])
    print(format_table(result))
    if json_path:
        write_json(result, json_path)
    return result


def _qa_runs(engine: str, specs, model: str, retriever, settings, base_url: str | None, remote_model: str | None,
             stack: contextlib.ExitStack, dtype: str | None = None) -> list[tuple[str, object, str, dict]]:
    """(label, pipeline, method, options): each way `qa` answers the questions, over one
    ``retriever``; what must stop at the end (a server, a connection pool) goes on ``stack``."""
    from ragdec.decoding.generator import ChatTokenizer, Generator
    from ragdec.pipelines.rag import RagPipeline
    from ragdec.pipelines.remote import RemoteEngine
    from ragdec.pipelines.types import AUTO

    from .server_load import free_port, start_server, stop_server

    if engine == "openai":
        if not base_url or not remote_model:
            raise ValueError("--engine openai needs --base-url URL and --remote-model NAME")
        if specs and not model:
            raise ValueError("--engine openai with --methods runs them in process beside the server: name their model with "
                             "--model (the one the server runs, to compare like with like)")
    generator = Generator.load(model, dtype) if engine != "openai" or specs else None
    local = RagPipeline(generator, retriever, settings=settings) if generator else None
    in_process = [(label, local, name, options) for label, name, options in specs]
    if engine == "local":
        return in_process
    if engine == "openai":  # the local side first: the reference the server's answers are compared with
        remote = RemoteEngine(base_url, remote_model, tokenizer=ChatTokenizer(generator.tokenizer) if generator else model)
        stack.callback(remote.close)
        return [*in_process, ("remote", RagPipeline(remote, retriever, settings=settings), AUTO, {})]
    (label, name, options), *others = specs
    if others or options:
        raise ValueError(f"--engine loopback compares one method without knobs, in process and served: give --methods {name}")
    # the server runs the method of the in-process side, one request at a time (no batching loop), and no store: the
    # retrieval here gives both sides the same passages
    port = free_port()
    server = start_server(port, model, ["--no-cache", "--max-batch", "1", "--method", name])
    stack.callback(stop_server, server)
    remote = RemoteEngine(f"http://127.0.0.1:{port}/v1", model, tokenizer=ChatTokenizer(generator.tokenizer))
    stack.callback(remote.close)
    return [("in-process", local, name, options), ("remote", RagPipeline(remote, retriever, settings=settings), name, options)]


def remote_overhead(local_rows: list[dict], remote_rows: list[dict], method: str) -> dict:
    """What answering through the loopback server added to each question's end-to-end time:
    medians of both times, of remote / in-process per question, and of the difference.

    Example: in-process 2.0 and 4.0 s, remote 2.2 and 4.1 s -> ratios 1.1 and 1.025
    (median 1.0625), differences 200 and 100 ms (median 150).
    """
    pairs = list(zip(local_rows, remote_rows))
    return {
        "method": method,
        "seconds_in_process": _median(r["seconds"] for r in local_rows),
        "seconds_remote": _median(r["seconds"] for r in remote_rows),
        "ratio_remote_to_in_process": _median(remote["seconds"] / local["seconds"] for local, remote in pairs),
        "overhead_ms": _median(1000 * (remote["seconds"] - local["seconds"]) for local, remote in pairs),
        "ttft_s_in_process": _median(r["ttft_s"] for r in local_rows),
        "ttft_s_remote": _median(r["ttft_s"] for r in remote_rows),
        "identical": round(sum(local["text"] == remote["text"] for local, remote in pairs) / len(pairs), 4),
        "setup": "ragdec serve of the same model on 127.0.0.1 (--max-batch 1, --method as in process, no store, no QA "
                 "cache); retrieval and prompts in the benchmark's process for both; alternating per question after a "
                 "warm-up of each; seconds: request in to last chunk out, measured by the benchmark",
    }


def run_chat_bench(data: str | None, json_path: str | None, *, model: str, methods=None, limit: int | None = None,
                   max_new_tokens: int = 128, turns: int = CHAT_TURNS, progress: bool = True) -> dict:
    """Measure `chat-pipeline` (see the module's docstring)."""
    from tqdm import tqdm

    from ragdec.decoding.generator import Generator, configure_threads
    from ragdec.decoding.methods import GenerationParams
    from ragdec.pipelines.chat import ChatSession
    from ragdec.pipelines.rag import RagPipeline

    from .harness import write_json
    from .machine import machine_info

    configure_threads()
    stories = [s for s in read_jsonl(data_dir(data) / "dialogue" / "coqa.jsonl") if len(s["turns"]) >= turns][: limit or None]
    if not stories:
        raise ValueError(f"no CoQA story has {turns} turns: ask fewer with --turns")
    specs = _methods(methods)
    generator = Generator.load(model)
    pipeline = RagPipeline(generator)

    def converse(story: dict, name: str, options: dict) -> list[dict]:
        generator.prefixes.clear()  # each conversation starts cold, so methods prefill alike
        params = GenerationParams(max_new_tokens=max_new_tokens, method=name, options=options)
        session = ChatSession(pipeline, params, system=f"Answer questions about this story.\n\n{story['story']}")
        out = []
        for turn in story["turns"][:turns]:
            texts, start = [], time.perf_counter()
            for chunk in session.ask(turn["question"]):
                texts.append(chunk.text)
            seconds = time.perf_counter() - start
            if chunk.finish_reason == "error":
                raise RuntimeError(f"the pipeline failed: {chunk.info.error}")
            row = _row("".join(texts), chunk, seconds)
            row["f1"] = f1_score(row["text"], turn["answer"])
            out.append(row)
        return out

    for _, name, options in specs:  # warm-up
        converse(stories[0], name, options)
    rows: dict[str, list[dict]] = {label: [] for label, _, _ in specs}
    per_turn: dict[str, list[list[float]]] = {label: [[] for _ in range(turns)] for label, _, _ in specs}
    for i, story in tqdm(enumerate(stories), total=len(stories), desc="bench chat-pipeline", unit="story", disable=not progress):
        order = specs[i % len(specs):] + specs[: i % len(specs)]
        for label, name, options in order:
            conversation = converse(story, name, options)
            rows[label] += conversation
            for t, row in enumerate(conversation):
                per_turn[label][t].append(row["f1"])

    def quality(method_rows):
        return {"f1": round(statistics.mean(r["f1"] for r in method_rows), 4)}

    reference = specs[0][0]
    summary = _summary(rows, reference, quality)
    for label in summary:
        summary[label]["f1_per_turn"] = [round(statistics.mean(v), 4) for v in per_turn[label]]
    result = {
        "workload": "chat-pipeline",
        "machine": machine_info(),
        "settings": {"model": model, "methods": [s[0] for s in specs], "reference": reference, "stories": len(stories),
                     "turns": turns, "max_new_tokens": max_new_tokens,
                     "speed": "tokens_per_s: new tokens / whole turn time (prompt, prefill with kept history, decode), median over turns"},
        "methods": summary,
    }
    print(format_table(result))
    if json_path:
        write_json(result, json_path)
    return result


def format_table(result: dict) -> str:
    settings = result["settings"]
    lines = [f"{result['workload']} on {settings['model']} ({result['machine']['cpu']}, {result['machine']['cores']} cores)"]
    suffix = settings["reference"].replace("-", "_")
    for method, m in result["methods"].items():
        quality = ", ".join(f"{key} {m[key]:.3f}" for key in ("exact_match", "f1", "retrieval_hit_rate") if key in m)
        lines.append(
            f"  {method:<14} {quality}; {m['tokens_per_s']:.2f} tokens/s end to end "
            f"({m[f'speedup_vs_{suffix}']:.2f}x), decode {m['decode_tokens_per_s']:.2f} ({m[f'decode_speedup_vs_{suffix}']:.2f}x), "
            f"ttft {m['ttft_s']:.2f} s, {m['mean_tokens_per_forward']:.2f} tokens/forward, identical {m[f'identical_to_{suffix}']:.2f}"
        )
    if overhead := result.get("remote_overhead"):
        lines.append(
            f"  remote path ({overhead['method']}): {overhead['seconds_remote']:.3f} s against {overhead['seconds_in_process']:.3f} s "
            f"in process, ratio {overhead['ratio_remote_to_in_process']:.3f}, +{overhead['overhead_ms']:.0f} ms (medians)"
        )
    return "\n".join(lines)
