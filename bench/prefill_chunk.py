"""What a prefill chunk costs: the measurement behind ``scheduler.DEFAULT_PREFILL_CHUNK``.

    ragdec bench prefill-chunk --model qwen2.5-coder-0.5b-instruct --json bench/results/prefill_chunk.json

A request joining a running batch reads its prompt in chunks between the batch's decode
steps (chunked prefill): the running rows wait one chunk per step. Small chunks stall them
less; large ones read the prompt faster. For a prompt of about 1,000 tokens (a SQuAD
question with 3 passages and the system prompt, chat template applied) this measures, in
one process after a warm-up, alternating the settings, median of ``--repeats``:

- the whole prefill at once, and chunk by chunk for each chunk size: total seconds,
  tokens/s, and seconds per chunk;
- one decode step of a batch of 1 and of 8 rows (greedy, 500 cached positions each).

The chosen chunk is the largest whose one chunk costs at most ``STALL_STEPS`` decode steps
of a batch of 8 (``choose_chunk``): the running rows then lose at most that many steps'
time per step while a prompt joins, and the prompt reads as fast as that allows.
"""

from __future__ import annotations

import statistics
import sys
import time

CHUNKS = (32, 64, 128, 256, 512)
STALL_STEPS = 4  # a joining prompt may hold the running rows for about this many steps per chunk


def choose_chunk(chunks: dict[str, dict]) -> int:
    """The largest chunk that stalls a batch of 8 for at most ``STALL_STEPS`` steps (the
    smallest measured when none does).

    Example: stalls of 1.3, 2.0, 2.9, 5.1 and 9.0 steps for chunks 32 to 512 -> 128.
    """
    fitting = [int(c) for c, row in chunks.items() if row["stall_in_batch8_steps"] <= STALL_STEPS]
    return max(fitting) if fitting else min(int(c) for c in chunks)


def _prompt_ids(generator, data: str | None, tokens: int) -> list[int]:
    from .workloads import data_dir, read_jsonl

    root = data_dir(data)
    passages = [r["text"] for r in read_jsonl(root / "qa" / "squad_passages.jsonl")]
    text, ids = "", []
    for passage in passages:
        text += passage + "\n\n"
        ids = generator.prompt_ids(f"Passages:\n{text}Question: who is named in the passages?")
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def run_prefill_chunk_bench(json_path: str | None, model: str | None = None, data: str | None = None,
                            prompt_tokens: int = 1000, repeats: int = 3) -> dict:
    import torch

    from ragdec.decoding.batch_kv import TransformersRows, prefill_row
    from ragdec.decoding.generator import Generator
    from ragdec.decoding.kv import new_cache

    from .harness import write_json
    from .machine import machine_info

    model = model or "qwen2.5-coder-0.5b-instruct"
    generator = Generator.load(model)
    prompt = _prompt_ids(generator, data, prompt_tokens)
    lm = generator.model

    def prefill(chunk: int | None) -> tuple[float, list[float]]:
        cache = new_cache(lm)
        per_chunk = []
        size = chunk or len(prompt)
        started = time.perf_counter()
        for at in range(0, len(prompt), size):
            t0 = time.perf_counter()
            prefill_row(lm, prompt[at : at + size], cache)
            per_chunk.append(time.perf_counter() - t0)
        return time.perf_counter() - started, per_chunk

    def decode_step(rows: int) -> float:
        batch = TransformersRows(lm)
        for r in range(rows):
            cache = new_cache(lm)
            prefill_row(lm, prompt[r : r + 500], cache)
            batch.join(cache, 500)
        timings = []
        for step in range(6):
            t0 = time.perf_counter()
            batch.forward([[prompt[step]]] * rows, [500 + step] * rows)
            batch.keep([1] * rows)
            timings.append(time.perf_counter() - t0)
        return statistics.median(timings[1:])

    settings = [None, *CHUNKS]
    totals: dict[object, list[float]] = {s: [] for s in settings}
    chunk_s: dict[object, list[float]] = {s: [] for s in settings}
    with torch.inference_mode():
        prefill(128)  # warm-up
        for repeat in range(repeats):
            order = settings if repeat % 2 == 0 else settings[::-1]
            for setting in order:
                total, per_chunk = prefill(setting)
                totals[setting].append(total)
                chunk_s[setting].append(statistics.median(per_chunk))
            print(f"[prefill-chunk] repeat {repeat + 1}/{repeats}", file=sys.stderr)
        step_1 = decode_step(1)
        step_8 = decode_step(8)
    whole = statistics.median(totals[None])
    rows = {}
    for setting in CHUNKS:
        total = statistics.median(totals[setting])
        rows[str(setting)] = {
            "seconds": round(total, 3),
            "tokens_per_s": round(len(prompt) / total, 1),
            "speed_vs_whole": round(whole / total, 3),
            "seconds_per_chunk": round(statistics.median(chunk_s[setting]), 4),
            "stall_in_batch8_steps": round(statistics.median(chunk_s[setting]) / step_8, 2),
        }
    result = {
        "workload": "prefill-chunk",
        "model": model,
        "prompt_tokens": len(prompt),
        "repeats": repeats,
        "whole_prefill": {"seconds": round(whole, 3), "tokens_per_s": round(len(prompt) / whole, 1)},
        "chunks": rows,
        "decode_step_s": {"batch_1": round(step_1, 4), "batch_8": round(step_8, 4)},
        "rule": f"largest chunk costing at most {STALL_STEPS} batch-8 decode steps",
        "chosen_chunk": choose_chunk(rows),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(f"whole {whole:.2f} s; decode step batch 1 {step_1 * 1000:.0f} ms, batch 8 {step_8 * 1000:.0f} ms; "
          f"chosen chunk {result['chosen_chunk']}", file=sys.stderr)
    for setting, row in rows.items():
        print(f"  chunk {setting}: {row}", file=sys.stderr)
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    return result
