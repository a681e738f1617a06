"""`ragdec free train`: FREE's shallow-deep fine-tuning, its checkpoints and its model folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ragdec.decoding.free import FREE_META, trained_exit_layer
from ragdec.decoding.generator import Generator
from ragdec.decoding.methods import GenerationParams
from ragdec.training import free_train
from ragdec.training.free_train import TrainConfig, add_lora, merge_lora, train

from conftest import tiny_causal_lm
from helpers import random_prompts

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def four_layers(tiny_tokenizer) -> Generator:
    """A random 4-layer qwen2 (the tiny models have 2: there every exit layer is the default)."""
    model = tiny_causal_lm("qwen2", len(tiny_tokenizer), seed=3, hidden_size=48, intermediate_size=88, layers=4)
    return Generator(model, tiny_tokenizer, name="tiny-4")


def fresh(generator: Generator) -> Generator:
    """A copy to train (training changes the model in place, as a loaded one would be)."""
    return Generator(copy.deepcopy(generator.model), generator.tokenizer, name=generator.name)


PROMPTS = random_prompts(320, 15, seed=7)
SMALL = dict(exit_layer=1, steps=4, answer_tokens=8, top_k=8, batch_prompts=5, heldout_every=5, heldout_sequences=3,
             eval_every=2, checkpoint_every=2, sequences_per_step=2, warmup_steps=1)


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_writes_a_model_folder_that_free_loads_and_exits_where_trained(four_layers, tmp_path):
    out = tmp_path / "trained"
    generator = fresh(four_layers)
    report = train(generator, PROMPTS, TrainConfig(**SMALL), out, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", FREE_META, "train"} <= names
    meta = json.loads((out / FREE_META).read_text())
    assert meta["exit_layer"] == 1 and meta["base_model"] == "tiny-4" and meta["steps"] == 4
    assert [p["step"] for p in report.curve] == [0, 2, 4]
    assert report.curve[0]["deep_fidelity"] == 1.0  # before training the deep head is the original
    assert set(report.agreement_by_layer_before) == {"1", "2", "3"} == set(report.agreement_by_layer_after)
    assert report.train_answers == 12 and report.heldout_answers == 3 and report.seconds > 0
    # every decoder layer and the final norm learnt; the tied embeddings did not
    layer_params = sum(p.numel() for p in four_layers.model.model.layers.parameters())
    assert report.trainable_parameters == layer_params + four_layers.model.model.norm.weight.numel()
    after = weights_of(generator.model)
    original = weights_of(four_layers.model)
    assert torch.equal(after["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])

    loaded = Generator.load(str(out))
    assert all(torch.equal(v, after[k]) for k, v in weights_of(loaded.model).items())
    assert trained_exit_layer(str(out)) == 1
    prompt = PROMPTS[1]
    greedy = loaded.generate(prompt, GenerationParams(max_new_tokens=16, method="greedy"))
    lossless = loaded.generate(prompt, GenerationParams(max_new_tokens=16, method="free-lossless",
                                                        options={"exit_threshold": 0.2, "adaptive": False}))
    assert lossless.token_ids == greedy.token_ids
    drafter, _ = free_train_free(loaded, prompt)
    assert drafter.shallow_deep.exit_layer == 1  # the folder's, not the default (3 of 4)

    with pytest.raises(FileExistsError, match="already holds a trained model"):
        train(fresh(four_layers), PROMPTS, TrainConfig(**SMALL), out, progress=False)


def free_train_free(generator, prompt):
    from ragdec.decoding.free import build_free, free_config

    return build_free(generator, prompt, free_config({}), lossless=True)


def test_an_interrupted_run_resumes_to_the_same_weights(four_layers, tmp_path, monkeypatch):
    """Steps 1-2 checkpointed, the run killed during step 3's evaluation; the next run
    reads the teacher and the checkpoint (no new answers) and ends where an uninterrupted
    run does, bit for bit."""
    config = TrainConfig(**{**SMALL, "eval_every": 3})
    straight = fresh(four_layers)
    train(straight, PROMPTS, config, tmp_path / "straight", progress=False)

    real_evaluate = free_train.evaluate
    calls = []

    def dies_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # 1: before training; 2: at step 3, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(free_train, "evaluate", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(four_layers), PROMPTS, config, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / FREE_META).exists()
    assert torch.load(tmp_path / "resumed" / "train" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(free_train, "evaluate", real_evaluate)

    def no_new_answers(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(free_train, "teacher_answers", no_new_answers)
    resumed = fresh(four_layers)
    report = train(resumed, PROMPTS, config, tmp_path / "resumed", progress=False)
    assert [p["step"] for p in report.curve] == [0, 3, 4]
    expected = weights_of(straight.model)
    assert all(torch.equal(v, expected[k]) for k, v in weights_of(resumed.model).items())

    with pytest.raises(ValueError, match="another setting"):
        (tmp_path / "resumed" / FREE_META).unlink()
        train(fresh(four_layers), PROMPTS, TrainConfig(**{**SMALL, "shallow_weight": 0.9}), tmp_path / "resumed", progress=False)


def test_lora_trains_the_first_layers_only_and_merges_exactly(four_layers, tmp_path):
    generator = fresh(four_layers)
    report = train(generator, PROMPTS, TrainConfig(**{**SMALL, "exit_layer": 2, "lora_rank": 2}), tmp_path / "lora", progress=False)
    per_layer = sum(2 * (m.in_features + m.out_features) for n, m in four_layers.model.model.layers[0].named_modules()
                    if isinstance(m, torch.nn.Linear))
    assert report.trainable_parameters == 2 * per_layer
    before, after = weights_of(four_layers.model), weights_of(generator.model)
    assert set(after) == set(before)  # merged: no LoRA tensors left in the model
    changed = {k.split(".")[2] for k in after if k.startswith("model.layers.") and not torch.equal(after[k], before[k])}
    assert changed == {"0", "1"}

    # the merged linear computes what the wrapped one did
    model = copy.deepcopy(four_layers.model)
    wrapped = add_lora(model, 4, rank=3)
    with torch.no_grad():
        for _, _, lora in wrapped:
            lora.lora_b.normal_()
        ids = torch.tensor([PROMPTS[0]])
        with_lora = model(ids).logits
        merge_lora(wrapped)
        merged = model(ids).logits
    assert torch.allclose(with_lora, merged, atol=1e-4)


def test_bad_settings_say_what_to_pass(four_layers, tmp_path):
    with pytest.raises(ValueError, match="between 1 and 3"):
        train(fresh(four_layers), PROMPTS, TrainConfig(**{**SMALL, "exit_layer": 4}), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="--lora-rank must be at least 1"):
        train(fresh(four_layers), PROMPTS, TrainConfig(**{**SMALL, "lora_rank": 0}), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="too few"):
        train(fresh(four_layers), PROMPTS[:1], TrainConfig(**SMALL), tmp_path / "b", progress=False)
    assert trained_exit_layer(str(tmp_path)) is None
    (tmp_path / FREE_META).write_text("{not json")
    assert trained_exit_layer(str(tmp_path)) is None


def test_free_train_command_on_smollm2(weights, tmp_path, capsys):
    """`ragdec free train` end to end on smollm2: its answers to the sample's SQuAD prompts,
    two steps, a folder that `generate` loads by path, where free-lossless is greedy."""
    from ragdec.app.cli import main

    name = weights("smollm2-135m-instruct")
    out, report = tmp_path / "smollm2-free", tmp_path / "report.json"
    code = main(["free", "train", "--model", name, "--exit-layer", "10", "--steps", "2", "--prompts", "5",
                 "--data", str(DATA), "--workloads", "squad", "--answer-tokens", "6", "--eval-every", "1",
                 "--checkpoint-every", "1", "--out", str(out), "--quiet", "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trained for FREE at exit layer 10" in printed and f"--model {out}" in printed
    result = json.loads(report.read_text())
    assert result["exit_layer"] == 10 and [p["step"] for p in result["curve"]] == [0, 1, 2]
    trained = Generator.load(str(out))
    prompt = trained.prompt_ids("What is the capital of France?")
    greedy = trained.generate(prompt, GenerationParams(max_new_tokens=12, method="greedy"))
    lossless = trained.generate(prompt, GenerationParams(max_new_tokens=12, method="free-lossless"))
    assert lossless.token_ids == greedy.token_ids
    assert main(["generate", "--model", str(out), "--method", "free", "--max-new-tokens", "4", "--prompt", "Hello"]) == 0


def test_decoding_never_imports_training():
    """The layering: training (above) imports decoding, never the other way round; the
    decoder reads a trained folder's FREE_META itself. Imports inside functions count too."""
    import ast

    root = Path(__file__).parent.parent / "ragdec" / "decoding"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("training" in name or name.lstrip(".").startswith(("free_train", "free_calibrate")) for name in names):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
