"""llama.cpp as a benchmark peer (bench/llamacpp.py), and what every benchmark now reports
beside it: ``identical_to_greedy`` and ragdec's greedy run whenever a lossless method runs."""

from __future__ import annotations

import pytest

from ragdec.bench.harness import summarize, with_greedy
from ragdec.bench.llamacpp import DEFAULT_LOOKUP, LlamaCppEngines, _settings
from ragdec.bench.runners import Run
from ragdec.models import zoo


def test_greedy_joins_every_run_of_a_lossless_method():
    assert with_greedy(["hf-greedy", "llma"]) == ["hf-greedy", "llma", "greedy"]
    assert with_greedy(["hf-greedy", "llma:copy_k=4", "greedy"]) == ["hf-greedy", "llma:copy_k=4", "greedy"]
    # nothing lossless: nothing to compare with
    assert with_greedy(["hf-greedy", "llamacpp-greedy", "free"]) == ["hf-greedy", "llamacpp-greedy", "free"]


def test_a_method_on_another_model_is_compared_with_that_models_greedy():
    """``model=`` runs a spec on another model (one trained for FREE): its lossless methods
    are checked against that model's greedy, not the bench model's."""
    assert with_greedy(["hf-greedy", "free-lossless:model=/m2", "free:model=/m2"]) == [
        "hf-greedy", "free-lossless:model=/m2", "free:model=/m2", "greedy:model=/m2"]
    assert with_greedy(["llma", "free-lossless:model=/m2"]) == ["llma", "free-lossless:model=/m2", "greedy", "greedy:model=/m2"]

    def run(*tokens):
        return Run(tuple(tokens), 0.1, 0.5, len(tokens))

    summary = summarize({
        "hf-greedy": [run(1, 2), run(3, 4)],
        "greedy": [run(1, 2), run(3, 4)],
        "greedy:model=/m2": [run(1, 5), run(3, 4)],
        "free-lossless:model=/m2": [run(1, 5), run(3, 4)],
    })
    assert summary["free-lossless:model=/m2"]["identical_to_greedy"] == 1.0
    assert summary["free-lossless:model=/m2"]["identical_to_hf_greedy"] == 0.5  # the drift from the original
    assert summary["free-lossless:model=/m2"]["speedup_vs_greedy"] == 1.0
    assert "identical_to_greedy" not in summary["greedy:model=/m2"]


def test_identical_to_greedy_is_the_share_of_prompts_with_greedys_tokens():
    def run(*tokens):
        return Run(tuple(tokens), 0.1, 0.5, len(tokens))

    runs = {
        "hf-greedy": [run(1, 2, 3), run(4, 5)],
        "greedy": [run(1, 2, 3), run(4, 5)],
        "llma": [run(1, 2, 3), run(4, 5)],
        "llamacpp-greedy": [run(1, 2, 3), run(4, 6)],
    }
    summary = summarize(runs)
    assert summary["llma"]["identical_to_greedy"] == 1.0
    assert summary["llamacpp-greedy"]["identical_to_greedy"] == 0.5
    assert "identical_to_greedy" not in summary["greedy"]
    assert summary["llamacpp-greedy"]["identical_to_hf_greedy"] == 0.5


def test_llamacpp_settings_are_checked():
    assert _settings("llamacpp-prompt-lookup", {}) == {"method": "llamacpp-prompt-lookup", **DEFAULT_LOOKUP}
    assert _settings("llamacpp-prompt-lookup", {"num_pred_tokens": 4})["num_pred_tokens"] == 4
    with pytest.raises(ValueError, match="settings are num_pred_tokens, max_ngram_size"):
        _settings("llamacpp-prompt-lookup", {"copy_k": 4})
    with pytest.raises(ValueError, match="takes no settings"):
        _settings("llamacpp-greedy", {"num_pred_tokens": 2})


def test_only_gguf_models_have_a_gguf_file():
    with pytest.raises(zoo.ZooError, match="has no GGUF source"):
        zoo.gguf_file("all-minilm-l6-v2")


def test_llamacpp_runs_the_zoos_gguf_on_ragdecs_prompt_ids(smollm2):
    """Both llama.cpp methods decode the same chat-templated ids ragdec decodes, from the
    zoo's verified GGUF; prompt lookup drafts from a prompt that invites copying (fewer
    forwards than tokens), and stops at EOS or the token budget as ragdec's methods do."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here: run `make llamacpp`")
    assert zoo.gguf_file("smollm2-135m-instruct").read_bytes()[:4] == b"GGUF"
    engines = LlamaCppEngines("smollm2-135m-instruct", threads=2, n_ctx=1024)
    text = "The river Rhine rises in the Swiss Alps, flows through Germany and reaches the North Sea in the Netherlands."
    prompt_ids = smollm2.prompt_ids([{"role": "user", "content": f"Repeat this sentence exactly: {text}"}])
    greedy = engines.run("llamacpp-greedy", {}, prompt_ids, 40, smollm2.eos_token_ids)
    lookup = engines.run("llamacpp-prompt-lookup", {"num_pred_tokens": 4}, prompt_ids, 40, smollm2.eos_token_ids)
    for run in (greedy, lookup):
        assert 0 < len(run.token_ids) <= 40
        assert run.token_ids[-1] in smollm2.eos_token_ids or len(run.token_ids) == 40
        assert 0 < run.ttft_s <= run.e2e_s
    assert "Rhine" in smollm2.decode_text(greedy.token_ids)
    assert greedy.forward_passes == len(greedy.token_ids)  # the prefill, then one per token after the first
    assert lookup.forward_passes < len(lookup.token_ids)  # drafts stood
    # llama.cpp's own prompt lookup keeps its greedy's tokens here (its claim, checked)
    assert lookup.token_ids == greedy.token_ids
    assert set(engines.rss_mb) == {"llamacpp-greedy", "llamacpp-prompt-lookup:num_pred_tokens=4:max_ngram_size=3"}
    # a second run starts from an empty KV cache and gives the same tokens
    assert engines.run("llamacpp-greedy", {}, prompt_ids, 40, smollm2.eos_token_ids).token_ids == greedy.token_ids


def test_llamacpp_verify_measures_cost_and_row_invariance(smollm2):
    """The low-level driver of `ragdec bench llamacpp-verify` on smollm2's GGUF: a cost per
    draft width, and batched rows compared with one-at-a-time decoding of the same tokens
    (a batch of one is the same computation: its row is bitwise equal)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here: run `make llamacpp`")
    from ragdec.bench.llamacpp_verify import WIDTHS, LowLevelLlama, cost_curve, invariance

    prompt = smollm2.prompt_ids("Name three rivers of Europe and the seas they reach.")
    llama = LowLevelLlama(str(zoo.gguf_file("smollm2-135m-instruct")), threads=2, repack=False, flash_attn="off", kv="f16", n_ctx=512)
    try:
        curve = cost_curve(llama, prompt, repeats=1)
        assert len(curve) == len(WIDTHS) and all(s > 0 for s in curve)
        one = invariance(llama, prompt, 1)
        assert one == {"rows": 1, "bitwise_equal_rows": 1, "same_argmax_rows": 1, "max_abs_diff": 0.0}
        four = invariance(llama, prompt, 4)
        assert four["rows"] == 4 and 0 <= four["bitwise_equal_rows"] <= four["same_argmax_rows"] <= 4
    finally:
        llama.close()
