"""FREE: nothing exits -> greedy; the lossless mode equals greedy; stacked tokens get the
deep-layer KV that full decoding computes; the Beta mixture puts the threshold between
agreeing and disagreeing confidences."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ragdec.decoding import free
from ragdec.decoding.free import ExitThreshold, FreeConfig, ShallowDeep, build_free, exit_adapter
from ragdec.decoding.generator import Generator
from ragdec.decoding.kv import new_cache
from ragdec.decoding.methods import GenerationParams

from helpers import random_prompts

DATA = Path(__file__).parent / "data"  # small samples of the benchmark data


def greedy(generator: Generator, prompt, max_new_tokens=24, stop=()):
    return generator.generate(prompt, GenerationParams(max_new_tokens=max_new_tokens, stop=stop))


def run_free(generator: Generator, prompt, method="free-lossless", max_new_tokens=24, stop=(), **options):
    options.setdefault("adaptive", False)
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=stop, method=method, options=options)
    return generator.generate(prompt, params)


@pytest.fixture
def noisy_adapter(tiny_generator):
    """A random (non-identity) adapter on the tiny model's exit layer, so that the shallow
    head often disagrees with the deep model; removed after the test."""
    torch.manual_seed(1)
    adapter = exit_adapter(tiny_generator.model.config.hidden_size, rank=8)
    with torch.no_grad():
        adapter.up.weight.normal_(0, 3.0)
    state = tiny_generator.method_state.setdefault("free", free.FreeState())
    state.adapters[(1, None)] = adapter.eval()
    yield adapter
    tiny_generator.method_state.pop("free", None)


@pytest.mark.parametrize("method", ["free", "free-lossless"])
def test_nothing_exits_above_one_equals_greedy(tiny_generator, method):
    for prompt in random_prompts(len(tiny_generator.tokenizer), 4, seed=11):
        expected = greedy(tiny_generator, prompt)
        ours = run_free(tiny_generator, prompt, method, exit_layer=1, exit_threshold=1.01)
        assert ours.token_ids == expected.token_ids
        assert ours.stats.drafted_tokens == 0


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_lossless_equals_greedy_on_tiny_models(tiny_generator, noisy_adapter, threshold):
    drafted = rejected = 0
    for prompt in random_prompts(len(tiny_generator.tokenizer), 5, seed=int(threshold * 10)):
        expected = greedy(tiny_generator, prompt)
        ours = run_free(tiny_generator, prompt, exit_layer=1, exit_threshold=threshold, max_stack=6)
        assert (ours.token_ids, ours.text, ours.finish_reason) == (expected.token_ids, expected.text, expected.finish_reason)
        drafted += ours.stats.drafted_tokens
        rejected += ours.stats.drafted_tokens - ours.stats.accepted_tokens
    if threshold == 0.0:
        assert drafted > 0 and rejected > 0  # drafts and rollbacks really happen


def test_lossless_with_stop_strings_and_the_adaptive_threshold(tiny_generator, noisy_adapter):
    for prompt in random_prompts(len(tiny_generator.tokenizer), 4, seed=5):
        free_run = greedy(tiny_generator, prompt, 12)
        stop = (free_run.text[4:6],) if len(free_run.text) > 6 else ()
        expected = greedy(tiny_generator, prompt, 24, stop)
        ours = run_free(tiny_generator, prompt, stop=stop, exit_layer=1, exit_threshold=0.5, adaptive=True)
        assert (ours.token_ids, ours.text) == (expected.token_ids, expected.text)


def test_exit_vocabulary_is_the_first_ids_and_the_prompts():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 100, bias=False)
    ids = free.exit_vocabulary([3, 50, 99, 50, 7], 10, model)
    assert ids.tolist() == [*range(10), 50, 99]
    assert free.exit_vocabulary([3], 0, model) is None and free.exit_vocabulary([3], 100, model) is None


def test_lossless_with_a_small_exit_vocabulary_equals_greedy(tiny_generator, noisy_adapter):
    """The exit head scores a tenth of the vocabulary (plus the prompt's tokens): its drafts
    are argmaxes over that set, mapped back to token ids, and the deep pass still decides."""
    size = len(tiny_generator.tokenizer) // 10
    drafted = 0
    for prompt in random_prompts(len(tiny_generator.tokenizer), 4, seed=21):
        ours = run_free(tiny_generator, prompt, exit_layer=1, exit_threshold=0.0, exit_vocab=size, max_stack=6)
        assert ours.token_ids == greedy(tiny_generator, prompt).token_ids
        drafted += ours.stats.drafted_tokens
    assert drafted > 0
    lossy = run_free(tiny_generator, prompt, "free", exit_layer=1, exit_threshold=0.0, exit_vocab=size, max_stack=4)
    assert lossy.stats.drafted_tokens > 0
    assert lossy.stats.accepted_tokens == lossy.stats.drafted_tokens  # lossy keeps every exited token


def test_lossy_keeps_the_exited_tokens(tiny_generator, noisy_adapter):
    prompt = random_prompts(len(tiny_generator.tokenizer), 1, seed=3)[0]
    out = run_free(tiny_generator, prompt, "free", exit_layer=1, exit_threshold=0.0, max_stack=4)
    assert len(out.token_ids) == 24 or out.finish_reason == "stop"
    assert out.stats.accepted_tokens == out.stats.drafted_tokens > 0  # nothing rolled back
    assert out.stats.drafter_forward_passes > 0


def test_stacked_tokens_get_the_deep_kv_of_full_decoding(tiny_generator, noisy_adapter):
    """Prefill, three tokens through the shallow layers only, then one deep pass over the
    stack: every layer's cache equals that of one full forward over the same tokens."""
    model = tiny_generator.model
    prompt = random_prompts(len(tiny_generator.tokenizer), 1, seed=9)[0] + [7, 8]
    stacked = [21, 45, 3, 60]
    with torch.inference_mode():
        shallow_deep = ShallowDeep(model, 1, noisy_adapter)
        cache = new_cache(model)
        shallow_deep(torch.tensor([prompt]), past_key_values=cache, logits_to_keep=1)
        for token in stacked[:3]:
            shallow_deep.shallow_step(token)
        assert cache.get_seq_length(0) == len(prompt) + 3 and cache.get_seq_length(1) == len(prompt)
        # the verify: 3 stacked tokens plus one that runs both halves in the batch
        logits = shallow_deep(torch.tensor([stacked]), past_key_values=cache, logits_to_keep=4).logits
        reference = new_cache(model)
        full = model(input_ids=torch.tensor([prompt + stacked]), past_key_values=reference, use_cache=True)
    for layer, expected in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, expected.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values, expected.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], full.logits[0, -4:], atol=1e-3, rtol=1e-3)


def test_beta_mixture_threshold_docstring_example():
    rng = random.Random(0)
    threshold = ExitThreshold(0.9, agree_posterior=0.9, decay=1.0)
    for _ in range(700):
        threshold.observe(min(rng.betavariate(*ExitThreshold.beta_moments(0.9, 0.004)), 0.9999), True)
    for _ in range(300):
        threshold.observe(rng.betavariate(*ExitThreshold.beta_moments(0.4, 0.02)), False)
    assert 0.7 <= threshold.value <= 0.8
    assert threshold.posterior(0.95) > 0.99 and threshold.posterior(0.3) < 0.1


def test_threshold_starts_at_the_option_and_stays_without_pairs():
    threshold = ExitThreshold(0.8)
    for _ in range(10):
        threshold.observe(0.9, True)
    assert threshold.value == 0.8  # too few pairs (and no disagreement) to fit
    fixed = ExitThreshold(0.7, adaptive=False)
    for _ in range(100):
        fixed.observe(0.99, False)
    assert fixed.value == 0.7


def test_fitted_thresholds_persist_per_setting(tiny_generator):
    """Requests with the same setting share one fitted threshold; another setting (a
    sweep alternating in one bench run) gets its own and does not reset the first."""
    tiny_generator.method_state.pop("free", None)
    try:
        def threshold(lossless=False, **options):
            config = free.free_config({"exit_layer": 1, **options}, lossless=lossless)
            drafter, _ = build_free(tiny_generator, [5, 6, 7], config, lossless)
            return drafter.threshold

        first = threshold()
        first.value = 0.61  # as if fitted
        other = threshold(agree_posterior=0.8)
        assert other is not first and other.value == 0.9
        assert threshold() is first and first.value == 0.61
        assert threshold(lossless=True) not in (first, other)
        assert threshold(adaptive=False) is not threshold(adaptive=False)  # a fixed threshold is not kept
    finally:
        tiny_generator.method_state.pop("free", None)


def test_default_exit_layer():
    assert free.default_exit_layer(24) == 17 and free.default_exit_layer(28) == 20
    assert free.default_exit_layer(2) == 1


def test_options_and_errors(tiny_generator):
    with pytest.raises(ValueError, match="unknown free option"):
        run_free(tiny_generator, [5, 6], exit_level=1)
    with pytest.raises(ValueError, match="exit_layer must be between"):
        run_free(tiny_generator, [5, 6], exit_layer=2)
    config = free.free_config({"exit_layer": "1", "exit_threshold": "0.7", "adaptive": "no"})
    assert config == FreeConfig(exit_layer=1, exit_threshold=0.7, adaptive=False)


def test_lossless_equals_greedy_on_smollm2(smollm2):
    questions = [
        "What is the capital of France?",
        "List three prime numbers.",
    ]
    for question in questions:
        prompt = smollm2.prompt_ids(question)
        expected = greedy(smollm2, prompt, 24)
        for threshold in (0.3, 0.8):
            ours = run_free(smollm2, prompt, max_new_tokens=24, exit_layer=20, exit_threshold=threshold)
            assert ours.token_ids == expected.token_ids, (question, threshold)
    smollm2.method_state.pop("free", None)


def test_calibration_trains_and_saves_only_the_adapter(tiny_generator, tmp_path, monkeypatch):
    """A few steps on the tiny model, from its own answers and from text: the adapter is
    saved where FREE looks for it (and nothing else is), loads, and FREE with it still
    equals greedy in lossless mode."""
    import json

    from safetensors.torch import load_file

    from ragdec.training.free_calibrate import CalibrationConfig, calibrate
    from conftest import TRAINING_TEXT

    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path / "home"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"document": t * 3}) + "\n" for t in TRAINING_TEXT * 4), encoding="utf-8")
    config = CalibrationConfig(exit_layers=(1,), steps=12, seq_len=16, train_sequences=10, heldout_sequences=4,
                               batch_positions=32, top_k=8, rank=4, answer_tokens=8, batch_prompts=3)
    prompts = random_prompts(len(tiny_generator.tokenizer), 10, seed=4)
    tiny_generator.method_state.pop("free", None)
    try:
        for source in ("answers", "text"):
            kwargs = {"prompts": prompts} if source == "answers" else {"data": data}
            [report] = calibrate(tiny_generator, config, progress=False, **kwargs)
            assert report.source == source and report.train_positions > 0 and report.heldout_positions > 0
            assert report.path == str(free.adapter_path(tiny_generator.name, 1))
            assert set(load_file(report.path)) == {"down.weight", "up.weight"}
            assert 0.0 <= report.agreement_before <= 1.0 and 0.0 <= report.agreement_after <= 1.0
            assert set(report.exits_after) == {"0.5", "0.7", "0.9"}
            assert [p.name for p in (tmp_path / "home" / "free").rglob("*") if p.is_file()] == ["layer1.safetensors"]
            prompt = random_prompts(len(tiny_generator.tokenizer), 1, seed=2)[0]
            ours = run_free(tiny_generator, prompt, exit_layer=1, exit_threshold=0.3)
            assert tiny_generator.method_state["free"].adapters[(1, None)] is not None  # the saved adapter was used
            assert ours.token_ids == greedy(tiny_generator, prompt).token_ids
            tiny_generator.method_state.pop("free", None)
        with pytest.raises(ValueError, match="between 1 and 1"):
            calibrate(tiny_generator, CalibrationConfig(exit_layers=(2,)), prompts=prompts)
        with pytest.raises(ValueError, match="one of the two"):
            calibrate(tiny_generator, config)
    finally:
        tiny_generator.method_state.pop("free", None)


def test_answers_teacher_follows_greedy(tiny_generator):
    """The answers teacher's positions are the model's greedy answers: at each, the deep
    argmax is the next answer token, up to and including EOS and nothing after it; held-out
    prompts are every n-th; one run serves several exit layers."""
    from ragdec.training.free_calibrate import CalibrationConfig, answers_teacher

    prompts = random_prompts(len(tiny_generator.tokenizer), 6, seed=5)
    config = CalibrationConfig(exit_layers=(0, 1), answer_tokens=10, batch_prompts=1, heldout_every=3, top_k=4, teacher_dtype=None)
    train, heldout = answers_teacher(tiny_generator.model, prompts, tiny_generator.eos_token_ids, 1, config, progress=False)
    answers = {i: list(greedy(tiny_generator, p, max_new_tokens=10).token_ids) for i, p in enumerate(prompts)}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches go by prompt length
    assert heldout.top_ids[:, 0].tolist() == [t for i in order if i % 3 == 0 for t in answers[i]]
    assert train.top_ids[:, 0].tolist() == [t for i in order if i % 3 != 0 for t in answers[i]]
    for teacher in (train, heldout):
        assert set(teacher.exit_hidden) == {0, 1}
        assert all(h.shape == teacher.deep.shape for h in teacher.exit_hidden.values())
        assert teacher.top_probs.shape == teacher.top_ids.shape == (teacher.deep.shape[0], 4)
    first = order[0]  # layer 0's input is the token embedding of each answer position's token
    tokens = [prompts[first][-1], *answers[first][:-1]]
    embeddings = tiny_generator.model.model.embed_tokens(torch.tensor(tokens)).float()
    stack = heldout if first % 3 == 0 else train
    torch.testing.assert_close(stack.exit_hidden[0][: len(tokens)], embeddings.detach())


def test_calibration_text_windows(tmp_path):
    import json

    from ragdec.training.free_calibrate import read_texts, sequences

    data = tmp_path / "cnndm.jsonl"
    data.write_text(json.dumps({"prompt": "Summarize", "docs": ["first passage", "second passage"]}) + "\n", encoding="utf-8")
    assert read_texts(data) == ["first passage\n\nsecond passage"]

    class Words:  # a tokenizer of one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    windows = sequences(Words(), ["a" * 10, "b" * 3, "c" * 25], seq_len=4, count=6, per_text=4)
    assert windows == [[97] * 4] * 2 + [[99] * 4] * 4  # 2 windows of the first, none of the short one
    with pytest.raises(ValueError, match="only 2 windows"):
        sequences(Words(), ["a" * 10], seq_len=4, count=5)


def test_methods_are_registered():
    from ragdec.decoding.methods import BUILTIN_METHOD_MODULES, METHODS, method_factory

    assert "ragdec.decoding.free" in BUILTIN_METHOD_MODULES
    method_factory("greedy")
    assert {"free", "free-lossless"} <= set(METHODS)


def test_free_calibrate_command_on_own_answers(smollm2, tmp_path, capsys, monkeypatch):
    """`ragdec free calibrate` end to end on smollm2: answers to the SQuAD prompts of the
    repository's sample (past those the benchmarks use), two exit layers from one teacher
    run, a JSON report per layer; a workload without data and a malformed layer list are
    refused with what to pass."""
    from ragdec.app.cli import main
    from ragdec.app.cli_free import CALIBRATION_SKIP, calibration_prompts
    from ragdec.bench.workloads import load_workload

    data = str(DATA)  # the sample holds SQuAD and CoQA only
    prompts = calibration_prompts(smollm2, per_workload=2, max_tokens=400, data=data, workloads=("squad",))
    assert len(prompts) == 2 and all(len(p) <= 400 for p in prompts)
    assert CALIBRATION_SKIP >= 12  # the committed benchmarks use the first 12 prompts at most
    benchmarked = [smollm2.prompt_ids(list(p.messages)) for p in load_workload("squad", data, limit=12)]
    assert not any(p in benchmarked for p in prompts)
    with pytest.raises(FileNotFoundError, match="'xsum'.*pass --data DIR.*--workloads"):
        calibration_prompts(smollm2, per_workload=1, max_tokens=400, data=data, workloads=("squad", "xsum"))

    out = tmp_path / "report.json"
    from ragdec.models.home import ragdec_home

    home = tmp_path / "home"  # adapters land here; the prepared models are linked in
    home.mkdir()
    (home / "models").symlink_to(ragdec_home() / "models")
    monkeypatch.setenv("RAGDEC_HOME", str(home))
    code = main(["free", "calibrate", "--model", "smollm2-135m-instruct", "--exit-layer", "10,20", "--prompts", "4",
                 "--data", data, "--workloads", "squad",
                 "--answer-tokens", "6", "--max-prompt-tokens", "400", "--steps", "3", "--rank", "4", "--quiet",
                 "--json", str(out)])
    assert code == 0
    reports = json.loads(out.read_text())
    assert [r["exit_layer"] for r in reports] == [10, 20] and {r["source"] for r in reports} == {"answers"}
    assert sorted(p.name for p in (home / "free").rglob("*")) == ["layer10.safetensors", "layer20.safetensors", "smollm2-135m-instruct"]
    assert "exit layer 20: shallow/deep top-1 agreement" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["free", "calibrate", "--exit-layer", "10,x"])
    assert "integers separated by commas" in capsys.readouterr().err
