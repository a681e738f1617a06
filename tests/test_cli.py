"""The command line, end to end on smollm2-135m-instruct."""

from __future__ import annotations

import json

import pytest

from ragdec.app.cli import main

pytestmark = pytest.mark.real_model


def test_generate_writes_text_tokens_and_stats(tmp_path, capsys):
    out = tmp_path / "out.json"
    reference = tmp_path / "ref.txt"
    reference.write_text("The capital of France is Paris. Paris lies on the Seine.")
    code = main([
        "generate", "--model", "smollm2-135m-instruct", "--method", "llma", "--prompt", "What is the capital of France?",
        "--max-new-tokens", "12", "--reference-file", str(reference), "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"text", "token_ids", "stats"}
    assert set(result["stats"]) >= {"forward_passes", "new_tokens", "drafted_tokens", "accepted_tokens", "seconds"}
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) <= 12
    assert result["text"] and result["text"] in capsys.readouterr().out


def test_unknown_model_is_a_one_line_error(capsys):
    code = main(["generate", "--model", "no-such-model", "--prompt", "hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err and "Traceback" not in err


def test_models_list_shows_every_zoo_model(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct", "multilingual-e5-small", "all-minilm-l6-v2"):
        assert name in out


def test_bench_runs_methods_against_baselines(tmp_path, capsys):
    rag = tmp_path / "rag"
    rag.mkdir()
    records = [
        {"query": "where is the eiffel tower", "docs": ["The Eiffel Tower is in Paris, France.", "It was built in 1889."], "davinci_answer": "The Eiffel Tower is in Paris, France."},
        {"query": "what do bees make", "docs": ["Bees make honey from nectar.", "Honey is stored in combs."], "davinci_answer": "Bees make honey from nectar."},
    ]
    (rag / "llma_msmarco.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bench.json"
    code = main([
        "bench", "rag", "--model", "smollm2-135m-instruct", "--data", str(tmp_path), "--limit", "2",
        "--max-new-tokens", "10", "--methods", "hf-greedy,greedy,hf-prompt-lookup,llma:copy_k=4", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "transformers"}
    assert set(result["methods"]) == {"hf-greedy", "greedy", "hf-prompt-lookup", "llma:copy_k=4"}
    for entry in result["methods"].values():
        assert set(entry) >= {"tokens_per_s", "speedup_vs_hf_greedy", "identical_to_hf_greedy", "mean_tokens_per_forward", "mean_new_tokens", "ttft_s", "e2e_s"}
    # lossless methods give hf-greedy's tokens on these prompts
    assert result["methods"]["greedy"]["identical_to_hf_greedy"] == 1.0
    assert result["methods"]["llma:copy_k=4"]["identical_to_hf_greedy"] == 1.0
    assert "hf-prompt-lookup" in capsys.readouterr().out
