"""`ragdec bench first-answer`: how long `make demo`'s first question waits for its first text
on a machine that has never answered one.

A fresh machine has prepared weights and nothing else: no measured draft costs
(``$RAGDEC_HOME/costs``) and no compiled prompt kernels (inductor's cache). Each variant
runs the demo's commands as a user does, each in its own process, in a home of its own
whose ``models/`` is the prepared zoo (loading the weights is not what is measured) and
with an empty inductor cache:

    ragdec models prepare MODEL EMBEDDER [--no-measure]
    ragdec index build SAMPLE --store STORE
    ragdec ask --store STORE --no-cache -k 3 --max-new-tokens 96 Q1 Q2 --json ANSWERS

and reads each question's ``ttft_s`` (request in, after loading, to first text out) from the
answers. Variants: ``prepared`` (the demo as it is: `models prepare` times the draft costs)
and ``unprepared`` (``--no-measure``: the first question times them itself). They run in
turns, ``--limit`` rounds (default 2), and the medians are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ("In what year was Nikola Tesla born?", "Where did the black death originate?")
VARIANTS = {"prepared": [], "unprepared": ["--no-measure"]}
EMBEDDER = "multilingual-e5-small"


def _ragdec(args: list[str], env: dict) -> float:
    """Run ``ragdec ARGS`` to its end; its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ragdec.app.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ragdec {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def run_variant(model: str, extra: list[str], work: Path, sample: str) -> dict:
    """One fresh machine's demo: the commands' seconds and each question's ttft."""
    from ragdec.models.home import ragdec_home

    home = work / "home"
    home.mkdir(parents=True)
    (home / "models").symlink_to(ragdec_home() / "models")
    env = {**os.environ, "RAGDEC_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    env.pop("RAGDEC_COMPILE", None)
    prepare_s = _ragdec(["models", "prepare", model, EMBEDDER, *extra], env)
    store = work / "demo.store"
    index_s = _ragdec(["index", "build", sample, "--store", str(store)], env)
    answers = work / "answers.json"
    ask_s = _ragdec(["ask", "--store", str(store), "--no-cache", "-k", "3", "--max-new-tokens", "96", "--model", model,
                     *QUESTIONS, "--json", str(answers)], env)
    records = json.loads(answers.read_text())
    records = records if isinstance(records, list) else records.get("answers", [records])
    return {
        "prepare_s": round(prepare_s, 2), "index_s": round(index_s, 2), "ask_s": round(ask_s, 2),
        "ttft_s": [round(r["info"]["ttft_s"], 3) for r in records],
        "new_tokens": [r["stats"]["new_tokens"] if r.get("stats") else None for r in records],
    }


def run_first_answer_bench(json_path: str | None, model: str | None = None, rounds: int = 2) -> dict:
    from ragdec.app.build import DEFAULT_MODEL
    from ragdec.data import sample_corpus_path

    from .harness import write_json
    from .machine import machine_info

    model = model or DEFAULT_MODEL
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        for name, extra in VARIANTS.items():  # in turns: a slow spell of the machine hits both
            with tempfile.TemporaryDirectory(prefix="ragdec-first-") as work:
                run = run_variant(model, extra, Path(work), str(sample_corpus_path()))
            runs[name].append(run)
            print(f"round {round_ + 1} {name}: first question's ttft {run['ttft_s'][0]:.2f} s, "
                  f"second {run['ttft_s'][1]:.2f} s (prepare {run['prepare_s']:.1f} s)", flush=True)
    summary = {
        name: {
            "first_question_ttft_s": statistics.median(r["ttft_s"][0] for r in rs),
            "second_question_ttft_s": statistics.median(r["ttft_s"][1] for r in rs),
            "prepare_s": statistics.median(r["prepare_s"] for r in rs),
            "ask_s": statistics.median(r["ask_s"] for r in rs),
        }
        for name, rs in runs.items()
    }
    result = {
        "workload": "first-answer", "model": model, "machine": machine_info(),
        "settings": {"rounds": rounds, "questions": list(QUESTIONS), "embedder": EMBEDDER,
                     "fresh": "own RAGDEC_HOME (prepared models linked in) and an empty inductor cache per run"},
        "summary": summary, "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    if json_path:
        write_json(result, json_path)
    return result
