"""`ragdec bench cache`: how often the QA cache serves, how often wrongly, and how fast.

- qqp (../shared/data/cache/qqp_pairs.jsonl, 2000 duplicate and 2000 hard non-duplicate
  Quora pairs): the semantic threshold is calibrated on half the pairs and the false-hit
  and hit rates measured on the other half, both ways round (2-fold); the threshold
  reported is the one calibrated on all pairs, which is what the cache ships.
- stackfaq (../shared/data/faq/stackfaq.jsonl): the 125 canonical questions are imported
  into a real cache (SQLite + FAISS); each human paraphrase is asked through
  ``QACache.similar`` with the FAQ policy calibrated on the other half of the FAQs (2-fold
  by FAQ): right FAQ served, wrong FAQ served, or sent to generation (near hit or miss).
  Quora questions, which no FAQ answers, measure what is served out of set.
- latency: lookups (exact check, FAISS search, entry fetch, guard, hit count) at 1k and
  100k entries, the question's vector given; the embedding of the question is timed apart.
  Entries beyond the real questions of the data are real question vectors with noise.

Everything runs on the primary embedder; ``compare`` embedders get qqp and stackfaq only.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .workloads import data_dir

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "cache.json"
DEFAULT_PLOT = RESULTS / "cache_calibration.png"
BENCH_MODEL = "bench-model"  # the model key lookups use; FAQ entries are curated, valid for any


def run_cache_bench(data: str | None, json_path: str | None, **kwargs) -> dict:
    """Measure the QA cache; print a table; write JSON to ``json_path`` (None: the
    committed bench/results/cache.json; "": nowhere).

    Keyword args:
        embedder: the primary embedder (default: the cache's default).
        compare: more embedders measured on qqp and stackfaq (default: multilingual-e5-small).
        latency_sizes: cache sizes for the latency test (default 1000, 100000).
        latency_queries: lookups timed per size (default 500).
        target_false_hit_rate / target_wrong_rate: calibration targets (0.01 / 0.02).
        plot: PNG path for the primary embedder's calibration plot ("" for none).
        generate: how many near-hit StackFAQ questions to answer with greedy and with LLMA
            (cache-assisted) on ``generate_model``, to show what near hits buy (default 0).
        embeddings_dir: a folder keeping computed embeddings between runs (default: none).
    """
    from ragdec.bench.machine import machine_info
    from ragdec.cache.calibration import read_pairs
    from ragdec.cache.faq import read_faq
    from ragdec.cache.lookup import DEFAULT_CACHE_EMBEDDER

    root = data_dir(data)
    primary = kwargs.get("embedder") or DEFAULT_CACHE_EMBEDDER
    compare = [name for name in kwargs.get("compare", ("multilingual-e5-small",)) if name != primary]
    pairs = read_pairs(root / "cache" / "qqp_pairs.jsonl")
    records = read_faq(root / "faq" / "stackfaq.jsonl")
    options = dict(
        target_false_hit_rate=kwargs.get("target_false_hit_rate", 0.01),
        target_wrong_rate=kwargs.get("target_wrong_rate", 0.02),
        embeddings_dir=kwargs.get("embeddings_dir"),
    )
    started = time.time()
    primary_result = _quality(primary, pairs, records, **options)
    result = {
        "embedder": primary,
        "qqp": primary_result["qqp"],
        "stackfaq": primary_result["stackfaq"],
        "policies": primary_result["policies"],
    }
    plot = kwargs.get("plot", str(DEFAULT_PLOT))
    if plot:
        _plot(primary_result, primary, plot)
        result["plot"] = Path(plot).name
    sizes = kwargs.get("latency_sizes", (1000, 100_000))
    if sizes:
        result["latency_ms"] = _latency(
            primary_result["embedder_object"], primary_result["vectors"], sizes, kwargs.get("latency_queries", 500),
            primary_result["pairs_calibration"].policy,
        )
    if kwargs.get("generate"):
        result["generation"] = _generation(primary_result, kwargs["generate"], kwargs.get("generate_model", "qwen2.5-coder-0.5b-instruct"))
    result["alternatives"] = {}
    for name in compare:
        other = _quality(name, pairs, records, **options)
        result["alternatives"][name] = {"qqp": other["qqp"], "stackfaq": other["stackfaq"], "policies": other["policies"]}
    result["targets"] = {"qqp_false_hit_rate_max": 0.01, "stackfaq_right_rate_min": 0.70, "stackfaq_wrong_rate_max": 0.02, "latency_p50_ms_100k_max": 5.0}
    result["data"] = {"qqp_pairs": len(pairs), "stackfaq_questions": len(records), "stackfaq_paraphrases": sum(len(r.paraphrases) for r in records)}
    result["machine"] = {**machine_info(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    result["wall_s"] = round(time.time() - started, 1)
    print(format_table(result))
    if json_path != "":
        from ragdec.bench.harness import write_json

        write_json(result, json_path or DEFAULT_JSON)
    return result


# ---- quality ---------------------------------------------------------------------------


def _embed(embedder, texts: Sequence[str], embeddings_dir: str | None):
    """Question vectors of ``texts`` [n, d], kept in ``embeddings_dir`` when given (keyed by
    the embedder's weights and the texts)."""
    import numpy as np

    from ragdec.cache.calibration import embed_unique

    if embeddings_dir:
        key = hashlib.sha256(json.dumps([embedder.info.version, list(texts)]).encode()).hexdigest()[:16]
        path = Path(embeddings_dir) / f"{embedder.info.name}-{key}.npy"
        if path.is_file():
            return np.load(path)
    vectors = embed_unique(embedder, texts, progress=True)
    if embeddings_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return vectors


def _quality(name: str, pairs, records, target_false_hit_rate: float, target_wrong_rate: float, embeddings_dir: str | None) -> dict:
    import numpy as np

    from ragdec.cache.calibration import calibrate_pairs, guard_passes
    from ragdec.retrieval.embedder import Embedder

    print(f"[cache bench] {name}: embedding questions ...", file=sys.stderr)
    embedder = Embedder(name)
    faq_texts = [r.question for r in records] + [p for r in records for p in r.paraphrases]
    texts = [p.a for p in pairs] + [p.b for p in pairs] + faq_texts
    vectors = _embed(embedder, texts, embeddings_dir)
    n = len(pairs)
    a, b = vectors[:n], vectors[n : 2 * n]
    faq_vectors = vectors[2 * n :]
    scores = (a * b).sum(axis=1)
    duplicate = np.array([p.duplicate for p in pairs])
    guard = guard_passes(pairs)

    # qqp: 2-fold held out, and the calibration on all pairs that the cache ships
    whole = calibrate_pairs(scores, duplicate, guard, target_false_hit_rate)
    folds, false_hits, non_duplicates, hits, duplicates = [], 0, 0, 0, 0
    for fold in (0, 1):
        calibrate_on = np.arange(n) % 2 == fold
        fold_result = calibrate_pairs(scores[calibrate_on], duplicate[calibrate_on], guard[calibrate_on], target_false_hit_rate)
        test = ~calibrate_on
        served = test & guard & (scores >= fold_result.policy.semantic_threshold)
        fold_false, fold_hits = int((served & ~duplicate).sum()), int((served & duplicate).sum())
        false_hits += fold_false
        hits += fold_hits
        non_duplicates += int((test & ~duplicate).sum())
        duplicates += int((test & duplicate).sum())
        folds.append({
            "threshold": fold_result.policy.semantic_threshold,
            "false_hit_rate": round(fold_false / int((test & ~duplicate).sum()), 4),
            "hit_rate": round(fold_hits / int((test & duplicate).sum()), 4),
        })
    qqp = {
        "threshold": whole.policy.semantic_threshold,
        "false_hit_rate": round(false_hits / non_duplicates, 4),
        "hit_rate": round(hits / duplicates, 4),
        "near_threshold": whole.policy.near_threshold,
        "near_rate_duplicates": round(float((scores[duplicate] >= whole.policy.near_threshold).mean()), 4),
        "method": "2-fold: threshold calibrated on half the pairs, rates measured on the other half",
        "folds": folds,
        "in_sample": {"false_hit_rate": round(whole.false_hit_rate, 4), "hit_rate": round(whole.hit_rate, 4), "false_hit_upper_95": round(whole.false_hit_upper, 4)},
        "guard_alone": {"false_hit_rate": round(float(guard[~duplicate].mean()), 4), "hit_rate": round(float(guard[duplicate].mean()), 4)},
        "threshold_alone_at_same_false_rate": _unguarded_hit_rate(scores, duplicate, whole.false_hit_rate),
    }
    first = {text: i for i, text in reversed(list(enumerate(texts[: 2 * n])))}
    out_of_set = (list(first), vectors[list(first.values())])  # distinct Quora questions: no FAQ answers them
    stackfaq, faq_policy, faq_scores = _stackfaq(embedder, records, faq_vectors, target_wrong_rate, out_of_set, target_false_hit_rate)
    return {
        "qqp": qqp,
        "stackfaq": stackfaq,
        "policies": {"pairs": whole.policy.as_dict(), "faq": faq_policy.as_dict()},
        "pairs_calibration": whole,
        "faq_scores": faq_scores,
        "faq_policy": faq_policy,
        "embedder_object": embedder,
        "vectors": {"pairs": vectors[: 2 * n], "pair_texts": texts[: 2 * n], "faq": faq_vectors, "faq_texts": faq_texts},
        "records": records,
    }


def _unguarded_hit_rate(scores, duplicate, false_rate: float) -> dict:
    """Without the guard, the hit rate at the lowest threshold with the same false-hit rate."""
    import numpy as np

    non = np.sort(scores[~duplicate])[::-1]
    allowed = int(false_rate * len(non))
    threshold = float(non[allowed]) + 1e-6 if allowed < len(non) else float(non[-1])
    return {"threshold": round(threshold, 4), "hit_rate": round(float((scores[duplicate] >= threshold).mean()), 4)}


def _faq_cache(embedder, records, faq_vectors, folder: Path):
    """A real cache holding the canonical questions (curated), vectors given."""
    from ragdec.cache.faq import faq_entries
    from ragdec.cache.lookup import QACache
    from ragdec.cache.store import EmbedderIdentity, QAStore

    info = embedder.info
    store = QAStore.open(folder / "stackfaq.sqlite", EmbedderIdentity(info.name, info.version, info.dimension))
    cache = QACache(store, embedder)
    cache.put_many(faq_entries(records, "stackfaq.jsonl", with_paraphrases=False), faq_vectors[: len(records)])
    return cache


def _stackfaq(embedder, records, faq_vectors, target_wrong_rate: float, out_of_set, target_out_rate: float):
    import numpy as np

    from ragdec.cache.calibration import calibrate_faq
    from ragdec.cache.faq import score_paraphrases, score_questions

    paraphrase_vectors = faq_vectors[len(records) :]
    queries = [(i, r.id, p) for i, r in enumerate(records) for p in r.paraphrases]
    out_texts, out_vectors = out_of_set
    with tempfile.TemporaryDirectory() as folder:
        cache = _faq_cache(embedder, records, faq_vectors, Path(folder))
        scores = score_paraphrases(cache, records, paraphrase_vectors, source="stackfaq.jsonl")
        out_scores = score_questions(cache, out_texts, out_vectors)[:3]
        position = np.array([i for i, _, _ in queries])
        out_position = np.arange(len(out_texts))
        whole = calibrate_faq(scores.top, scores.margin, scores.guard_pass, scores.right, target_wrong_rate, out_scores, target_out_rate)
        counts = {"right": 0, "wrong": 0, "near": 0, "miss": 0}
        out_served, out_total, folds = 0, 0, []
        for fold in (0, 1):
            on, out_on = position % 2 == fold, out_position % 2 == fold
            policy = calibrate_faq(
                scores.top[on], scores.margin[on], scores.guard_pass[on], scores.right[on], target_wrong_rate,
                tuple(x[out_on] for x in out_scores), target_out_rate,
            ).policy
            fold_counts = {"right": 0, "wrong": 0, "near": 0, "miss": 0}
            for k in np.flatnonzero(~on):  # real lookups: SQLite, FAISS, guard, decision
                _, record_id, question = queries[k]
                lookup = cache.similar(question, model=BENCH_MODEL, policy=policy, vector=paraphrase_vectors[k], curated_only=True, count_hit=False)
                if lookup.served:
                    source = cache.store.entries([lookup.entry_id])[lookup.entry_id].source
                    fold_counts["right" if source == f"faq:stackfaq.jsonl#{record_id}" else "wrong"] += 1
                else:
                    fold_counts[lookup.outcome] += 1
            fold_out = 0
            for k in np.flatnonzero(~out_on):
                lookup = cache.similar(out_texts[k], model=BENCH_MODEL, policy=policy, vector=out_vectors[k], curated_only=True, count_hit=False)
                fold_out += lookup.served
            total = sum(fold_counts.values())
            folds.append({
                "policy": policy.as_dict(),
                **{f"{k}_rate": round(v / total, 4) for k, v in fold_counts.items()},
                "out_of_set_served_rate": round(fold_out / int((~out_on).sum()), 4),
            })
            for key in counts:
                counts[key] += fold_counts[key]
            out_served += fold_out
            out_total += int((~out_on).sum())
        cache.close()
    total = sum(counts.values())
    stackfaq = {
        "right_rate": round(counts["right"] / total, 4),
        "wrong_rate": round(counts["wrong"] / total, 4),
        "generated_rate": round((counts["near"] + counts["miss"]) / total, 4),
        "near_rate": round(counts["near"] / total, 4),
        "miss_rate": round(counts["miss"] / total, 4),
        "queries": total,
        "out_of_set_served_rate": round(out_served / out_total, 4),
        "out_of_set_queries": out_total,
        "method": (
            "canonical questions imported; paraphrases asked with the FAQ policy calibrated on the other half of the FAQs "
            "(2-fold); out of set: distinct Quora questions from qqp_pairs, half used in calibration, the other half asked"
        ),
        "folds": folds,
        "in_sample": {
            "right_rate": round(whole.right_rate, 4),
            "wrong_rate": round(whole.wrong_rate, 4),
            "out_of_set_served_rate": round(whole.out_of_set_rate, 4),
        },
        "top1_accuracy": round(float(scores.right.mean()), 4),
    }
    return stackfaq, whole.policy, scores


def _plot(quality: dict, name: str, path: str) -> None:
    from ragdec.cache.calibration import faq_curve, plot_calibration

    scores = quality["faq_scores"]
    rows = faq_curve(scores.top, scores.margin, scores.guard_pass, scores.right, quality["faq_policy"])
    plot_calibration(quality["pairs_calibration"], path, f"QA cache calibration, {name} (qqp_pairs, stackfaq)", rows, quality["faq_policy"])


# ---- latency ---------------------------------------------------------------------------


def _percentiles(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3), "n": len(ms)}


def _latency(embedder, vectors: dict, sizes: Sequence[int], queries: int, policy) -> dict:
    """Lookup time at each size under the calibrated pairs ``policy``, vectors given; plus
    the time to embed one question."""
    import numpy as np

    from ragdec.cache.lookup import QACache
    from ragdec.cache.store import EmbedderIdentity, NewEntry, QAStore

    info = embedder.info
    identity = EmbedderIdentity(info.name, info.version, info.dimension)
    base_texts = list(dict.fromkeys(vectors["pair_texts"]))
    first_row = {text: i for i, text in reversed(list(enumerate(vectors["pair_texts"])))}
    base_vectors = vectors["pairs"][[first_row[t] for t in base_texts]]
    query_vectors = vectors["faq"][-queries:]
    query_texts = vectors["faq_texts"][-queries:]
    rng = np.random.default_rng(0)
    result: dict = {}
    for size in sizes:
        print(f"[cache bench] latency at {size} entries ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "latency.sqlite"
            store = QAStore.open(path, identity)
            for start in range(0, size, 5000):
                rows = range(start, min(size, start + 5000))
                entries, batch = [], []
                for i in rows:
                    j = i % len(base_texts)
                    if i < len(base_texts):
                        entries.append(NewEntry(base_texts[j], f"answer {i}", BENCH_MODEL))
                        batch.append(base_vectors[j])
                    else:  # a neighbour of a real question: cosine ~0.85 to it
                        noisy = base_vectors[j] + rng.normal(0, 0.03, info.dimension).astype(np.float32)
                        entries.append(NewEntry(f"{base_texts[j]} [{i}]", f"answer {i}", BENCH_MODEL))
                        batch.append(noisy / np.linalg.norm(noisy))
                store.put(entries, np.stack(batch))
            store.close()
            opened = time.perf_counter()
            store = QAStore.open(path, identity)
            cache = QACache(store, embedder)
            len(cache.store.index)  # the rebuild from SQLite (IVF cells trained and kept at 100k)
            first_open = time.perf_counter() - opened
            store.close()
            opened = time.perf_counter()
            store = QAStore.open(path, identity)
            cache = QACache(store, embedder)
            kind = cache.store.index.spec.kind
            reopen = time.perf_counter() - opened
            for text, vector in zip(query_texts[:20], query_vectors[:20]):  # warm-up
                cache.lookup(text, model=BENCH_MODEL, vector=vector, policy=policy)
            load = os.getloadavg()[0]  # the machine is shared: what else ran while timing
            timings, outcomes = [], {}
            for text, vector in zip(query_texts, query_vectors):
                t0 = time.perf_counter()
                lookup = cache.lookup(text, model=BENCH_MODEL, vector=vector, policy=policy)
                timings.append(time.perf_counter() - t0)
                outcomes[lookup.outcome] = outcomes.get(lookup.outcome, 0) + 1
            exact = []
            for text in base_texts[:200]:
                t0 = time.perf_counter()
                cache.lookup(text, model=BENCH_MODEL, policy=policy)
                exact.append(time.perf_counter() - t0)
            label = f"{size // 1000}k" if size % 1000 == 0 else str(size)
            result[label] = {
                **_percentiles(timings),
                "exact_hit": _percentiles(exact),
                "index": kind,
                "open_s": round(reopen, 2),
                "first_open_s": round(first_open, 2),
                "outcomes": outcomes,
                "load_average_1m": round(load, 2),
            }
            if kind == "ivf":
                result[label]["ivf_top1_recall"] = _ivf_recall(cache.store, query_vectors[:200])
            store.close()
    singles = []
    for text in query_texts[:100]:
        t0 = time.perf_counter()
        embedder.embed_questions([text])
        singles.append(time.perf_counter() - t0)
    result["embed_question"] = _percentiles(singles)
    result["note"] = (
        "p50/p95 of QACache.lookup with the question's vector given (exact check, FAISS search of 16, "
        "entry fetch, guard, hit count); embedding the question is embed_question, on top"
    )
    return result


def _ivf_recall(store, queries) -> float:
    """Share of queries whose IVF top-1 is the exact top-1."""
    import numpy as np

    ids, vectors = store.index.ids_and_vectors()
    agree = 0
    for query in queries:
        exact = int(ids[int(np.argmax(vectors @ query))])
        found = store.search(query, 1)
        agree += bool(found) and found[0][0] == exact
    return round(agree / len(queries), 4)


# ---- what near hits buy ------------------------------------------------------------------


def _generation(quality: dict, count: int, model: str) -> dict:
    """Answer ``count`` StackFAQ paraphrases that the FAQ policy sends to generation, with
    greedy and with LLMA over the near-hit answers; the texts must be equal (lossless)."""
    from ragdec.cache.faq import faq_messages
    from ragdec.decoding.generator import Generator
    from ragdec.decoding.methods import GenerationParams

    records = quality["records"]
    embedder = quality["embedder_object"]
    vectors = quality["vectors"]
    queries = [p for r in records for p in r.paraphrases]
    generator = Generator.load(model)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = _faq_cache(embedder, records, vectors["faq"], Path(folder))
        for k, question in enumerate(queries):
            if len(rows) >= count:
                break
            lookup = cache.similar(question, model=model, policy=quality["faq_policy"], vector=vectors["faq"][len(records) + k], curated_only=True, count_hit=False)
            if lookup.outcome != "near":
                continue
            prompt_ids = generator.prompt_ids(faq_messages(question, lookup.references))
            runs = {}
            for method in ("greedy", "llma"):
                generation = generator.generate(prompt_ids, GenerationParams(max_new_tokens=128, method=method), references=list(lookup.references))
                runs[method] = generation
            rows.append({
                "equal": runs["greedy"].text == runs["llma"].text,
                "new_tokens": runs["llma"].stats.new_tokens,
                "greedy_tokens_per_s": runs["greedy"].stats.decode_tokens_per_s,
                "llma_tokens_per_s": runs["llma"].stats.decode_tokens_per_s,
                "llma_tokens_per_forward": runs["llma"].stats.tokens_per_forward,
            })
        cache.close()
    speedups = [r["llma_tokens_per_s"] / r["greedy_tokens_per_s"] for r in rows if r["greedy_tokens_per_s"]]
    return {
        "model": model,
        "questions": len(rows),
        "all_equal": all(r["equal"] for r in rows),
        "median_speedup": round(statistics.median(speedups), 3) if speedups else None,
        "median_tokens_per_forward": round(statistics.median(r["llma_tokens_per_forward"] for r in rows), 3) if rows else None,
        "rows": rows,
    }


# ---- report ------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    lines = [f"QA cache, embedder {result['embedder']}"]
    q, f = result["qqp"], result["stackfaq"]
    lines.append(f"  qqp      threshold {q['threshold']:.4f}: false hits {q['false_hit_rate']:.2%} (target <= 1%), hits {q['hit_rate']:.1%}  [held out]")
    lines.append(
        f"  stackfaq right {f['right_rate']:.1%} (target >= 70%), wrong {f['wrong_rate']:.2%} (<= 2%), "
        f"generated {f['generated_rate']:.1%}; unrelated questions served {f['out_of_set_served_rate']:.2%}  [held out]"
    )
    for size, row in result.get("latency_ms", {}).items():
        if isinstance(row, dict) and "p50" in row and "exact_hit" in row:
            lines.append(f"  lookup   {size:>5}: p50 {row['p50']:.2f} ms, p95 {row['p95']:.2f} ms ({row['index']}; exact hit p50 {row['exact_hit']['p50']:.2f} ms)")
    if "embed_question" in result.get("latency_ms", {}):
        e = result["latency_ms"]["embed_question"]
        lines.append(f"  embed    one question: p50 {e['p50']:.1f} ms, p95 {e['p95']:.1f} ms")
    if "generation" in result:
        g = result["generation"]
        lines.append(f"  near-hit generation ({g['model']}, {g['questions']} questions): LLMA/greedy {g['median_speedup']}x, equal: {g['all_equal']}")
    for name, other in result.get("alternatives", {}).items():
        lines.append(
            f"  [{name}] qqp false {other['qqp']['false_hit_rate']:.2%} hits {other['qqp']['hit_rate']:.1%}; "
            f"stackfaq right {other['stackfaq']['right_rate']:.1%} wrong {other['stackfaq']['wrong_rate']:.2%}"
        )
    return "\n".join(lines)
