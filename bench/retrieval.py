"""`ragdec bench retrieval`: recall and MRR of dense E5, BM25, hybrid and MiniLM on SQuAD;
build throughput; query latency at 1k and 100k passages; memory per vector; and, with
``--backend faiss,qdrant,pgvector``, the same recall and latency on Qdrant and on PostgreSQL
with pgvector beside FAISS's.

Quality: the 995 SQuAD v1.1 dev paragraphs of ``qa/squad_passages.jsonl`` are indexed as a
user would (``ragdec index build``: chunking, titles embedded), and each of the 400
questions of ``qa/squad_questions.jsonl`` is asked; a hit is the gold paragraph (a chunk of
it). recall@k: share of questions whose gold paragraph is in the first k distinct
paragraphs; MRR: mean of 1 / rank of the gold paragraph within the first 10 (0 beyond).

Scale: the 1k store is padded to 100k passages with perturbed copies of the real ones: the
vector of a random real passage plus Gaussian noise (then normalized), under the text of a
real passage with its sentences shuffled. Embedding 100k passages would take more than an
hour on 2 cores, and what is timed here (FAISS over 100k vectors, SQLite over 100k rows)
does not depend on where the vectors came from. Latency is one question at a time, as a
chatbot asks: embedding, index search and fetching the passages, each timed, p50 and p95.

Backends: the E5 store's passages and vectors (the same ids, the same float32 vectors) are
copied into a Qdrant collection (``--qdrant URL``, default ``:memory:``), which answers the
same questions; what differs is the search alone (for BM25, also its idf: see
``ragdec.retrieval.sparse``). On ``:memory:`` Qdrant is qdrant-client's local mode, a scan
in Python within this process: its recall is Qdrant's, its latency is not a server's.
On pgvector (``--pgvector URL``, a real server: ``tests/pgvector_server.py`` starts one)
dense search is measured twice, through the HNSW index (``e5``) and as an exact scan
(``e5_exact``, which ranks as FAISS's flat index); its keyword search is PostgreSQL's
``ts_rank``, which has no idf (see ``ragdec.retrieval.pgvector_store``).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

K_VALUES = (1, 5, 10)
SCALE = 100_000  # passages in the scale test
NOISE = 0.05  # per-dimension std of the noise on padded vectors (unit vectors: ~1/sqrt(384) = 0.051 per dim)
BACKENDS = ("faiss", "qdrant", "pgvector")
BENCH_COLLECTION = "ragdec-bench-retrieval"  # made on --qdrant for the run, deleted after it
BENCH_TABLE = "ragdec_bench_retrieval"  # made on --pgvector for the run, dropped after it
# the flags of add_arguments, as run_retrieval_bench's keywords
FLAGS = ("embedder", "baseline_embedder", "scale", "questions", "nprobe", "latency_queries", "backend", "qdrant",
         "pgvector")


def add_arguments(parser) -> None:
    """Flags of ``ragdec bench retrieval`` beyond --data and --json."""
    parser.add_argument("--embedder", default="multilingual-e5-small", help="dense model measured as 'e5'")
    parser.add_argument("--baseline-embedder", default="all-minilm-l6-v2", help="dense model measured as 'minilm'")
    parser.add_argument("--scale", type=int, default=SCALE, help="passages in the scale test (0: skip it)")
    parser.add_argument("--questions", type=int, help="first N questions only")
    parser.add_argument("--nprobe", type=int, help="IVF cells read per query in the scale test (default nlist // 40)")
    parser.add_argument("--latency-queries", type=int, default=200, help="questions timed one at a time")
    parser.add_argument("--backend", default="faiss", metavar="faiss,qdrant,pgvector",
                        help="retrieval backends measured side by side on the same E5 passages and vectors "
                        "(recall of dense, BM25 and hybrid; query latency); FAISS, the workload's own store, always")
    parser.add_argument("--qdrant", default=":memory:", metavar="URL",
                        help=f"the Qdrant measured (collection {BENCH_COLLECTION}, deleted after the run); "
                        ":memory: is qdrant-client's local mode in this process: its latency is not a server's")
    parser.add_argument("--pgvector", metavar="URL",
                        help=f"the PostgreSQL with pgvector measured (table ragdec_passages.{BENCH_TABLE}, dropped "
                        "after the run): postgresql://USER@HOST/DATABASE; python tests/pgvector_server.py starts one")


def _qa_dir(data: str | None) -> Path:
    from ragdec.bench.workloads import data_dir

    if data and (Path(data) / "squad_passages.jsonl").is_file():
        return Path(data)
    return data_dir(data) / "qa"


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms_summary(seconds: Sequence[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"p50": round(_percentile(ms, 0.5), 3), "p95": round(_percentile(ms, 0.95), 3), "mean": round(statistics.mean(ms), 3)}


def quality(rankings: Sequence[Sequence[str]], gold: Sequence[str]) -> dict:
    """recall@1/5/10 and MRR@10 of paragraph rankings (distinct ids, best first).

    Example: rankings [["a", "b"], ["c", "d", "e"]], gold ["b", "x"] -> recall@1 0.0,
    recall@5 0.5 (b at rank 2), recall@10 0.5, MRR (1/2 + 0) / 2 = 0.25.
    """
    result = {}
    for k in K_VALUES:
        result[f"recall@{k}"] = round(sum(g in r[:k] for r, g in zip(rankings, gold)) / len(gold), 4)
    reciprocal = [1 / (r.index(g) + 1) if g in r[:10] else 0.0 for r, g in zip(rankings, gold)]
    result["mrr"] = round(statistics.mean(reciprocal), 4)
    return result


def _paragraph_rankings(retriever, questions: Sequence[str], mode: str) -> list[list[str]]:
    """Distinct gold-comparable paragraph ids (the record of each hit), best first, 10 each."""
    rankings = []
    for start in range(0, len(questions), 64):
        for hits in retriever.search_batch(questions[start : start + 64], k=30, mode=mode):
            rankings.append(list(dict.fromkeys(hit.passage.record for hit in hits))[:10])
    return rankings


def _build_store(passages_file: Path, folder: Path, embedder) -> tuple[object, dict]:
    from ragdec.retrieval.ingest import build
    from ragdec.retrieval.persistence import Settings

    cpu_started = time.process_time()
    report = build([passages_file], folder, embedder=embedder, settings=Settings(), progress=True)
    cpu_seconds = time.process_time() - cpu_started  # every thread of this process
    return report, {
        "passages": report.passages_added,
        # end to end: reading, chunking, embedding, storing, saving
        "passages_per_s_end_to_end": round(report.passages_added / report.seconds, 2),
        "seconds": round(report.seconds, 2),
        "embed_seconds": round(report.embed_seconds, 2),
        "passages_per_s": round(report.passages_per_s, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        # 2 x passages per CPU-second: what 2 idle cores would do with both threads busy.
        # Less sensitive than wall time to other work on a shared machine, but threads
        # spin while waiting for each other, so under load it still reads low
        "passages_per_s_from_cpu_time": round(2 * report.passages_added / cpu_seconds, 2),
    }


def _time_queries(retriever, questions: Sequence[str], mode: str = "dense") -> dict:
    """One question at a time: embed, index search, fetch, each timed; and the CPU time of
    the whole, which a lone query spends on this one thread (``Embedder`` and
    ``VectorIndex`` run it single-threaded), so it is the wall time on an idle core. The
    backend is asked as ``Retriever.search`` asks it, so FAISS and Qdrant are timed alike."""
    backend = retriever.backend
    embed_s, index_s, fetch_s, total_s, cpu_s = [], [], [], [], []
    for question in questions[:5]:  # warm-up: caches, thread pools
        retriever.search(question, k=5, mode=mode)
    for question in questions:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        if mode == "bm25":
            t1 = t0
            ranking = backend.keywords([question], 5)[0]
        else:
            vector = retriever.embedder.embed_queries([question])
            t1 = time.perf_counter()
            ranking = backend.dense(vector, 5)[0]
        t2 = time.perf_counter()
        backend.passages([i for i, _ in ranking])
        t3 = time.perf_counter()
        cpu_s.append(time.thread_time() - c0)
        embed_s.append(t1 - t0)
        index_s.append(t2 - t1)
        fetch_s.append(t3 - t2)
        total_s.append(t3 - t0)
    return {"total_ms": _ms_summary(total_s), "embed_ms": _ms_summary(embed_s),
            "index_ms": _ms_summary(index_s), "fetch_ms": _ms_summary(fetch_s),
            "total_cpu_ms": _ms_summary(cpu_s), "queries": len(questions)}


def _shuffled_sentences(text: str, rng: random.Random) -> str:
    sentences = [s for s in text.replace("? ", "?. ").split(". ") if s]
    rng.shuffle(sentences)
    return ". ".join(sentences)


def _pad_store(retriever, target: int, seed: int = 0) -> float:
    """Add perturbed copies of the real passages until the store holds ``target``; returns seconds."""
    import numpy as np

    from ragdec.retrieval.store import Passage, content_hash

    started = time.perf_counter()
    real_ids, real_vectors = retriever.backend.index.ids_and_vectors()
    real = retriever.documents.get(real_ids.tolist())
    rng = random.Random(seed)
    generator = np.random.default_rng(seed)
    next_id = retriever.documents.next_id()
    while len(retriever) < target:
        n = min(10_000, target - len(retriever))
        picks = generator.integers(0, len(real_ids), n)
        vectors = real_vectors[picks] + generator.normal(0, NOISE, (n, real_vectors.shape[1])).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        passages = []
        for j, pick in enumerate(picks):
            source = real[int(real_ids[pick])]
            text = _shuffled_sentences(source.text, rng) + f" [copy {next_id + j}]"
            passages.append(Passage(next_id + j, text, source.title, "synthetic", f"pad {next_id + j}", 0, content_hash(text)))
        retriever.add_passages(passages, vectors)
        next_id += n
    return time.perf_counter() - started


def _index_agreement(flat, ivf, queries) -> float:
    """Share of the exact top-10 that the IVF index also returns (its recall against exact)."""
    _, exact = flat.search(queries, 10)
    _, approx = ivf.search(queries, 10)
    return round(float(sum(len(set(a) & set(e)) for a, e in zip(approx, exact)) / exact.size), 4)


def _copy_store(source, folder: Path, target) -> None:
    """A store in ``folder`` at ``target`` (a Qdrant or pgvector target) holding ``source``'s
    passages and vectors under the same ids (no embedding: what is compared is the search)."""
    from ragdec.retrieval.persistence import Settings
    from ragdec.retrieval.retriever import Retriever

    ids, vectors = source.backend.index.ids_and_vectors()
    passages = source.backend.passages(ids.tolist())
    # rebuild: replace the collection or table a run that died left behind
    with Retriever.open_for_writing(folder, source.embedder, Settings(**source.manifest.settings), rebuild=True,
                                    qdrant=target) as writer:
        for start in range(0, len(ids), 1024):
            writer.add_passages([passages[int(i)] for i in ids[start : start + 1024]], vectors[start : start + 1024])
        writer.save()


def measure_backend(retriever, texts: Sequence[str], gold: Sequence[str], timed: Sequence[str]) -> dict:
    """Recall of dense, BM25 and hybrid and the latency of dense and BM25 on one store."""
    from ragdec.retrieval.backends import location

    return {
        "store": location(retriever.manifest.backend),
        "recall": {method: quality(_paragraph_rankings(retriever, texts, mode), gold)
                   for method, mode in (("e5", "dense"), ("bm25", "bm25"), ("hybrid", "hybrid"))},
        "latency_ms": {"dense": _time_queries(retriever, timed), "bm25": _time_queries(retriever, timed, "bm25")},
    }


def _recall_at_5_gain(name: str, measured: dict, faiss_measured: dict) -> dict:
    """What recall@5 each method of ``measured`` gains (negative: loses) against FAISS's
    (``e5_exact`` against FAISS's ``e5``)."""
    return {f"{name}_minus_faiss_recall@5": {
        method: round(scores["recall@5"] - faiss_measured["recall"][method.removesuffix("_exact")]["recall@5"], 4)
        for method, scores in measured["recall"].items()
    }}


def qdrant_beside(faiss, tmp: Path, texts, gold, timed, url: str, faiss_measured: dict) -> dict:
    """The FAISS store ``faiss`` copied into Qdrant and measured alike; and what recall@5
    Qdrant gains (negative: loses) against FAISS's ``faiss_measured``."""
    from ragdec.retrieval.qdrant_store import QdrantTarget, drop
    from ragdec.retrieval.retriever import Retriever

    target = QdrantTarget(url, BENCH_COLLECTION)
    try:
        _copy_store(faiss, tmp / "qdrant", target)
        with Retriever.open(tmp / "qdrant", faiss.embedder) as qdrant:
            measured = measure_backend(qdrant, texts, gold, timed)
    finally:
        drop(target)
    return {"qdrant": measured} | _recall_at_5_gain("qdrant", measured, faiss_measured)


def pgvector_beside(faiss, tmp: Path, texts, gold, timed, url: str, faiss_measured: dict) -> dict:
    """The FAISS store ``faiss`` copied into a pgvector table and measured alike, its dense
    search also as an exact scan (``e5_exact``, ``dense_exact``); and what recall@5 it gains
    (negative: loses) against FAISS's ``faiss_measured``."""
    from ragdec.retrieval.pgvector_store import PgvectorTarget, drop
    from ragdec.retrieval.retriever import Retriever

    target = PgvectorTarget(url, BENCH_TABLE)
    try:
        _copy_store(faiss, tmp / "pgvector", target)
        with Retriever.open(tmp / "pgvector", faiss.embedder) as pgvector:
            measured = measure_backend(pgvector, texts, gold, timed)
            pgvector.backend.exact = True
            measured["recall"]["e5_exact"] = quality(_paragraph_rankings(pgvector, texts, "dense"), gold)
            measured["latency_ms"]["dense_exact"] = _time_queries(pgvector, timed)
    finally:
        drop(target)
    return {"pgvector": measured} | _recall_at_5_gain("pgvector", measured, faiss_measured)


def run_retrieval_bench(data: str | None, json_path: str | None, **kwargs) -> dict:
    """Run the measurement, print a table, write JSON to ``json_path`` (when given)."""
    from ragdec.bench.harness import write_json
    from ragdec.bench.machine import machine_info
    from ragdec.bench.workloads import read_jsonl
    from ragdec.decoding.generator import configure_threads
    from ragdec.retrieval.embedder import Embedder
    from ragdec.retrieval.index import IndexSpec
    from ragdec.retrieval.retriever import Retriever

    configure_threads()
    embedder_name = kwargs.get("embedder") or "multilingual-e5-small"
    baseline_name = kwargs.get("baseline_embedder") or "all-minilm-l6-v2"
    scale = SCALE if kwargs.get("scale") is None else kwargs["scale"]
    latency_queries = kwargs.get("latency_queries") or 200
    backends = [b.strip() for b in (kwargs.get("backend") or "faiss").split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise ValueError(f"--backend {','.join(unknown) or '(none)'}: choose from {','.join(BACKENDS)}")
    if "pgvector" in backends and not kwargs.get("pgvector"):
        raise ValueError("--backend pgvector measures a real server: give --pgvector postgresql://USER@HOST/DATABASE "
                         "(python tests/pgvector_server.py starts one and prints its URL)")
    qa = _qa_dir(data)
    passages_file = qa / "squad_passages.jsonl"
    records = read_jsonl(passages_file)
    questions = read_jsonl(qa / "squad_questions.jsonl")[: kwargs.get("questions") or None]
    texts = [q["question"] for q in questions]
    gold = [q["passage_id"] for q in questions]
    load_before = os.getloadavg()
    result: dict = {
        "machine": machine_info(),
        "data": {"passages": len(records), "questions": len(questions), "folder": str(qa)},
        "settings": {"embedder": embedder_name, "baseline_embedder": baseline_name, "k_values": list(K_VALUES),
                     "hybrid": "reciprocal rank fusion (rrf_k 60) of dense and BM25 top-50", "backends": backends},
        "methods": {},
        "build": {},
    }
    with tempfile.TemporaryDirectory(prefix="ragdec-bench-retrieval-") as tmp:
        # 1. quality and build speed, the main embedder (dense, BM25, hybrid)
        embedder = Embedder(embedder_name)
        _, result["build"]["e5"] = _build_store(passages_file, Path(tmp) / "e5", embedder)
        with Retriever.open(Path(tmp) / "e5", embedder) as retriever:
            result["build"]["e5"]["records"] = len({p.record for p in retriever.documents.get(retriever.documents.all_ids()).values()})
            timed = texts[:latency_queries]
            faiss = measure_backend(retriever, texts, gold, timed)
            result["methods"].update(faiss["recall"])
            result["latency_ms"] = {"1k": {"passages": len(retriever), "index": retriever.backend.index.spec.kind,
                                           **faiss["latency_ms"]}}
            # 1b. the other backends beside FAISS, on the same passages and vectors
            result["backends"] = {"faiss": faiss}
            if "qdrant" in backends:
                result["backends"] |= qdrant_beside(retriever, Path(tmp), texts, gold, timed,
                                                     kwargs.get("qdrant") or ":memory:", faiss)
            if "pgvector" in backends:
                result["backends"] |= pgvector_beside(retriever, Path(tmp), texts, gold, timed, kwargs["pgvector"], faiss)
        # 2. the baseline embedder, dense only
        baseline = Embedder(baseline_name)
        _, result["build"]["minilm"] = _build_store(passages_file, Path(tmp) / "minilm", baseline)
        with Retriever.open(Path(tmp) / "minilm", baseline) as retriever:
            result["methods"]["minilm"] = quality(_paragraph_rankings(retriever, texts, "dense"), gold)
        del baseline
        result["build_passages_per_s"] = result["build"]["e5"]["passages_per_s_end_to_end"]
        # 3. scale: pad the E5 store to `scale` passages; time flat and IVF
        if scale:
            folder = Path(tmp) / "e5"
            with Retriever.open_for_writing(folder, embedder) as retriever:
                pad_seconds = _pad_store(retriever, scale)
                started = time.perf_counter()
                manifest = retriever.save()  # "auto" turns the index into IVF at this size
                save_seconds = time.perf_counter() - started
            with Retriever.open(folder, embedder, nprobe=kwargs.get("nprobe")) as retriever:
                ivf = retriever.backend.index
                flat = ivf.convert(IndexSpec("flat"))
                query_vectors = embedder.embed_queries(texts)
                entry = {"passages": len(ivf), "pad_seconds": round(pad_seconds, 1), "save_seconds": round(save_seconds, 1),
                         "ivf": ivf.spec.as_dict(), "ivf_agreement_with_exact_at_10": _index_agreement(flat, ivf, query_vectors),
                         "recall_e5_ivf": quality(_paragraph_rankings(retriever, texts, "dense"), gold),
                         "dense_ivf": _time_queries(retriever, timed)}
                retriever.backend.index = flat
                entry["dense_flat"] = _time_queries(retriever, timed)
                entry["bm25"] = _time_queries(retriever, timed, "bm25")
                result["memory"] = {
                    "bytes_per_vector_flat": round(flat.memory_bytes() / len(flat), 1),
                    "bytes_per_vector_ivf": round(ivf.memory_bytes() / len(ivf), 1),
                    "bytes_per_passage_sqlite": round(os.path.getsize(folder / manifest.documents_file) / len(ivf), 1),
                    "dimension": embedder.info.dimension,
                }
                result["latency_ms"][f"{scale // 1000}k"] = entry
    result["load_average"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(format_table(result))
    if json_path:
        write_json(result, json_path)
    return result


def format_table(result: dict) -> str:
    lines = [f"retrieval on {result['data']['passages']} passages, {result['data']['questions']} questions "
             f"({result['machine']['cpu']}, {result['machine']['cores']} cores)"]
    header = ["method", "recall@1", "recall@5", "recall@10", "mrr"]
    rows = [[name] + [f"{scores[c]:.3f}" for c in header[1:]] for name, scores in result["methods"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
    lines.append(f"build: {result['build_passages_per_s']:.1f} passages/s (e5; from CPU time "
                 f"{result['build']['e5']['passages_per_s_from_cpu_time']:.1f}), "
                 f"{result['build']['minilm']['passages_per_s']:.1f} (minilm)")
    for scale, entry in result["latency_ms"].items():
        for name in ("dense", "dense_flat", "dense_ivf", "bm25"):
            if name in entry:
                timing = entry[name]
                lines.append(f"latency {scale} {name}: total p50 {timing['total_ms']['p50']:.1f} ms, "
                             f"p95 {timing['total_ms']['p95']:.1f} ms (index p50 {timing['index_ms']['p50']:.2f} ms; "
                             f"CPU p50 {timing['total_cpu_ms']['p50']:.1f} ms)")
    for name, entry in result.get("backends", {}).items():
        if not isinstance(entry, dict) or "recall" not in entry:
            continue
        recall = ", ".join(f"{method} {scores['recall@1']:.3f}/{scores['recall@5']:.3f}/{scores['recall@10']:.3f}"
                           for method, scores in entry["recall"].items())
        latency = ", ".join(f"{mode} p50 {timing['total_ms']['p50']:.1f} p95 {timing['total_ms']['p95']:.1f} ms"
                            for mode, timing in entry["latency_ms"].items())
        lines.append(f"{name} ({entry['store']}): recall@1/5/10 {recall}; latency {latency}")
    if "memory" in result:
        memory = result["memory"]
        lines.append(f"memory: {memory['bytes_per_vector_flat']:.0f} B/vector flat, {memory['bytes_per_vector_ivf']:.0f} B/vector IVF, "
                     f"{memory['bytes_per_passage_sqlite']:.0f} B/passage SQLite")
    return "\n".join(lines)
