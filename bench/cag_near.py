"""`ragdec bench cag-near`: the QA cache's near hits as LLMA's references, fairly.

An earlier cache-assisted workload used another model's answers (text-davinci-003's) as
the cached references, which a 0.5B model does not repeat. Here the cache holds what the
same model wrote: for duplicate question pairs (../shared/data/cache/qqp_pairs.jsonl,
duplicate = 1), the first question is answered through the pipeline with the QA cache on
(its answer written back), then the second is looked up:

- exact / semantic hit: served from the cache, nothing decoded;
- near hit: the cached answers become references, and the second question is answered
  afresh with greedy and with llma (alternating which goes first), the cache left
  unchanged by both (no write-back), so they answer the same prompt;
- miss: nothing to copy.

``near_in_prompt`` (``--near-in-prompt``): the near-hit answers also go into the prompt as
passages (``RagSettings.near_in_prompt``), for greedy and llma alike.

Reported over the second questions (each row names its pair by its place among the
file's duplicate pairs; the questions themselves are not copied into the results): the
outcome shares; on near hits, greedy vs llma decode tokens/s and end-to-end time
(medians, per-question ratios), identical answers, and ``copy_speedup_bound``: how fast an oracle drafter copying from the near-hit answers,
the question and the answer so far could decode greedy's answer on this machine's cost
curve (``copy_bound.py``), which says how much of the gap to a target is the drafter's
and how much is what the answers share; ``lookup_speedup_bound`` the same oracle copying
only after a one-token match, as LLMA finds its copies.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from .copy_bound import copy_speedup_bound
from .workloads import data_dir, read_jsonl

DEFAULT_PAIRS = 40  # duplicate pairs read (in file order)
MAX_NEW_TOKENS = 96


def _answer(pipeline, question: str, method: str, max_new_tokens: int) -> dict:
    from ragdec.pipelines.rag import question_request

    texts = []
    start = time.perf_counter()
    for chunk in pipeline.stream([question_request(question, method=method, max_new_tokens=max_new_tokens)]):
        texts.append(chunk.text)
    seconds = time.perf_counter() - start
    if chunk.finish_reason == "error":
        raise RuntimeError(f"the pipeline failed on {question!r}: {chunk.info.error}")
    stats = chunk.stats
    return {
        "text": "".join(texts),
        "outcome": chunk.info.cache,
        "method": chunk.info.method,
        "e2e_s": seconds,
        "new_tokens": stats.new_tokens if stats else 0,
        "decode_tokens_per_s": stats.decode_tokens_per_s if stats else None,
        "tokens_per_forward": stats.tokens_per_forward if stats else None,
    }


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _bounds(generator, cost, row: dict, question: str) -> dict:
    """The oracle's decode speedups for a near hit's greedy answer (``copy_bound.py``): from
    any place in the texts, and only after a one-token match as LLMA looks copies up; the
    loop's overhead per forward taken from greedy's measured step."""
    from ragdec.decoding.llma import reference_variants

    def ids(text):
        return generator.tokenizer(text, add_special_tokens=False)["input_ids"]

    answer = ids(row["greedy"]["text"])
    sources = [ids(v) for ref in row["references"] for v in reference_variants(ref)] + [ids(question)]
    step = 1.0 / row["greedy"]["decode_tokens_per_s"] if row["greedy"]["decode_tokens_per_s"] else cost.seconds[0]
    overhead = max(0.0, step - cost.seconds[0])
    bounds = {}
    for key, after_last in (("copy_speedup_bound", False), ("lookup_speedup_bound", True)):
        bound = copy_speedup_bound(answer, sources, cost.seconds, overhead, after_last)
        bounds[key] = None if bound is None else round(bound, 4)
    return bounds


def run_cag_near_bench(
    data: str | None, json_path: str | None, model: str = "qwen2.5-coder-0.5b-instruct", pairs: int = DEFAULT_PAIRS,
    max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = True, dtype: str = "float32", near_in_prompt: bool | None = None,
) -> dict:
    from tqdm import tqdm

    from ragdec.cache.lookup import QACache
    from ragdec.decoding.cost import forward_cost
    from ragdec.decoding.generator import Generator, configure_threads
    from ragdec.pipelines.rag import RagPipeline, RagSettings

    from .harness import write_json
    from .machine import machine_info

    if near_in_prompt is None:  # as the pipeline answers by default
        near_in_prompt = RagSettings.near_in_prompt

    configure_threads()
    records = [r for r in read_jsonl(data_dir(data) / "cache" / "qqp_pairs.jsonl") if int(r.get("duplicate", 0)) == 1][:pairs]
    generator = Generator.load(model, dtype=dtype)
    cost = forward_cost(generator.model, generator.name)
    with tempfile.TemporaryDirectory() as scratch:
        cache = QACache.open(Path(scratch) / "cache.sqlite")
        # the first questions write back; the second ones only read, so both methods see the same cache
        writer = RagPipeline(generator, None, cache, RagSettings(cache_answers=True))
        reader = RagPipeline(generator, None, cache, RagSettings(cache_answers=False, near_in_prompt=near_in_prompt))
        _answer(writer, "What is a warm-up question?", "greedy", 8)  # loads and warms the embedder and model
        rows = []
        for i, record in enumerate(tqdm(records, desc="cag-near", unit="pair", disable=not progress)):
            first = _answer(writer, record["a"], "greedy", max_new_tokens)
            # the questions stay in the data folder (Quora's terms): a row names its pair by
            # its place among the file's duplicate pairs
            row = {"pair": i, "first_answer": first["text"]}
            order = ("greedy", "llma") if i % 2 == 0 else ("llma", "greedy")
            for method in order:
                answer = _answer(reader, record["b"], method, max_new_tokens)
                row["outcome"] = answer["outcome"]
                if answer["outcome"] != "near":  # served, or nothing to copy: one look is enough
                    break
                row[method] = answer
            if row["outcome"] == "near":  # what llma was given to copy, for the oracle's bound
                lookup = cache.lookup(record["b"], model=reader.engine.name, store_version=reader.store_version, count_hit=False)
                row["references"] = list(lookup.references)
                row.update(_bounds(generator, cost, row, record["b"]))
            rows.append(row)
        cache.close()
    near = [r for r in rows if r["outcome"] == "near"]
    outcomes = {name: round(sum(r["outcome"] == name for r in rows) / max(1, len(rows)), 4) for name in ("exact", "semantic", "near", "miss")}
    methods = {}
    for method in ("greedy", "llma"):
        answers = [r[method] for r in near]
        methods[method] = {
            "decode_tokens_per_s": _median(a["decode_tokens_per_s"] for a in answers),
            "e2e_s": _median(a["e2e_s"] for a in answers),
            "mean_tokens_per_forward": round(statistics.mean(a["tokens_per_forward"] for a in answers), 4) if answers else None,
            "mean_new_tokens": round(statistics.mean(a["new_tokens"] for a in answers), 2) if answers else None,
        }
    speedups = [
        r["llma"]["decode_tokens_per_s"] / r["greedy"]["decode_tokens_per_s"]
        for r in near if r["llma"]["decode_tokens_per_s"] and r["greedy"]["decode_tokens_per_s"]
    ]
    methods["llma"].update(
        decode_speedup_vs_greedy=_median(speedups),
        e2e_speedup_vs_greedy=_median(r["greedy"]["e2e_s"] / r["llma"]["e2e_s"] for r in near),
        identical_to_greedy=round(sum(r["llma"]["text"] == r["greedy"]["text"] for r in near) / len(near), 4) if near else None,
        copy_speedup_bound=_median(r["copy_speedup_bound"] for r in near),
        lookup_speedup_bound=_median(r["lookup_speedup_bound"] for r in near),
    )
    result = {
        "machine": machine_info(),
        "workload": "cag-near",
        "model": model,
        "settings": {"pairs": len(rows), "max_new_tokens": max_new_tokens, "dtype": dtype, "near_in_prompt": near_in_prompt, "cache_embedder": cache.embedder.info.name},
        "targets": {"llma_decode_speedup_vs_greedy_on_near_hits_min": 2.0},
        "outcomes": outcomes,
        "near_hits": len(near),
        "methods": methods,
        "rows": rows,
    }
    print(
        f"cag-near on {model}: {len(rows)} second questions; outcomes {outcomes}; on {len(near)} near hits: "
        f"llma {methods['llma']['decode_speedup_vs_greedy']}x greedy decode tokens/s, "
        f"{methods['llma']['e2e_speedup_vs_greedy']}x end to end, identical {methods['llma']['identical_to_greedy']}; "
        f"an oracle copying from the same references: {methods['llma']['copy_speedup_bound']}x, "
        f"after a one-token match: {methods['llma']['lookup_speedup_bound']}x"
    )
    if json_path:
        write_json(result, json_path)
    return result
