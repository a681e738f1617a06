"""The int4 weight configuration: 4-bit weights, row-invariant, lossless methods equal greedy."""

from __future__ import annotations

import copy

import pytest
import torch

from ragdec.decoding.cost import forward_cost
from ragdec.decoding.generator import Generator, torch_dtype
from ragdec.decoding.attention import MAX_INVARIANT_QUERIES
from ragdec.decoding import int4
from ragdec.decoding.int4 import GROUP, INT4, quantize_model, quantize_weight, unpack_int4, weights_name
from ragdec.decoding.kv import new_cache
from ragdec.decoding.methods import GenerationParams

from conftest import tiny_causal_lm
from helpers import random_prompts


@pytest.fixture(scope="module")
def int4_tiny(tiny_tokenizer) -> Generator:
    """A random 2-layer qwen2 whose linear layers take groups of 32 (the tiny models' 48 do not)."""
    model = tiny_causal_lm("qwen2", len(tiny_tokenizer), seed=5, hidden_size=64, intermediate_size=128, layers=2)
    return Generator(quantize_model(model.to(torch.bfloat16)), tiny_tokenizer, name="tiny-int4")


def test_weights_are_4_bit_groups_and_the_kernel_computes_their_dense_form():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    packed, scales_and_zeros, dense = quantize_weight(weight)
    assert scales_and_zeros.shape == (128 // GROUP, 96, 2) and dense.dtype == torch.bfloat16
    # 16 levels per group of 32 inputs, no more
    groups = dense.float().reshape(96, 128 // GROUP, GROUP)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, GROUP)) <= 16
    assert (dense.float() - weight).abs().max() < 0.6 * (weight.max() - weight.min()) / 15
    x = torch.randn(5, 128).bfloat16()
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)
    assert torch.allclose(kernel.float(), x.float() @ dense.float().T, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("rows", [16, 80, 96, 4864 // 8])
def test_unpack_reads_the_kernels_packing_back(rows):
    """``weight`` of an int4 layer is unpacked from the kernel's own operands: whole blocks
    of 64 rows and a rest of 16 or 32 both come back as the dense form."""
    torch.manual_seed(rows)
    packed, scales_and_zeros, dense = quantize_weight(torch.randn(rows, 96) * 0.1)
    assert torch.equal(unpack_int4(packed, scales_and_zeros), dense)


def test_a_prompt_runs_in_8_bits_close_to_the_dense_product(int4_tiny):
    """Over more than MAX_INVARIANT_QUERIES positions a layer multiplies in int8 (each
    position's activations on 127 levels): within 3% of the dense bfloat16 product, the
    same whether its input was just quantized for a sibling projection or not."""
    layer = int4_tiny.model.model.layers[0].mlp.gate_proj
    torch.manual_seed(1)
    first, second = (torch.randn(1, MAX_INVARIANT_QUERIES + 9, layer.in_features).bfloat16() for _ in range(2))
    with torch.inference_mode():
        for x in (first, second, first):  # a new input is never taken for the last one
            dense = x.float() @ layer.weight.float().T
            out = layer(x)
            assert out.shape == dense.shape and out.dtype == torch.bfloat16
            assert ((out.float() - dense).norm() / dense.norm()) < 0.03
            assert torch.equal(layer(x), out)  # the remembered quantization gives the same bits


@pytest.mark.parametrize("kind", ["quantize", "gated"])
def test_the_compiled_prompt_path_equals_the_eager_one(kind, monkeypatch):
    """The fused (compiled) elementwise work of a prompt gives the codes and steps the eager
    torch ops give: within one code for a quantization; within three for the gated MLP,
    whose eager form rounds to bfloat16 after each of its four products, and rarely more
    than none (1 in 10 codes at most)."""
    monkeypatch.setenv(int4.COMPILE_ENV, "1")  # whatever an earlier test (a one-question ask) set
    torch.manual_seed(3)
    rows, width = MAX_INVARIANT_QUERIES + 30, 96
    if kind == "quantize":
        x = (torch.randn(rows, width) * torch.logspace(-2, 2, rows)[:, None]).bfloat16()
        args = (x,)
        fused, eager = int4._quantize_rows, int4.quantize_rows
    else:
        gate, up = (torch.randn(rows, width).mul(40).bfloat16() for _ in range(2))
        peak = torch.rand(rows, 1).div(10).bfloat16()
        args = (gate, up, peak)
        fused, eager = int4._gated_codes, int4._gated_codes_eager
    with torch.inference_mode():
        codes, steps = fused(*(a.clone() for a in args))
        eager_codes, eager_steps = eager(*(a.clone() for a in args))
    assert not fused.failed  # compiled here, not fallen back
    assert codes.dtype == torch.uint8 and codes.shape == (rows, width) and steps.shape == (rows, 1)
    differences = (codes.int() - eager_codes.int()).abs()
    assert differences.max() <= (1 if kind == "quantize" else 3) and differences.float().mean() < 0.1
    assert torch.allclose(steps.float(), eager_steps.float(), rtol=0.03)
    # every row reaches its extreme code: 127 levels of its own largest magnitude
    extremes = (codes.int() - 128).abs().amax(1)
    assert bool((extremes == 127).all())


def test_a_failed_compile_falls_back_to_the_eager_function(caplog):
    def untraceable(x):
        raise RuntimeError("no compiler here")

    fused = int4._Fused(untraceable, lambda x: x + 1)
    with caplog.at_level("WARNING"):
        assert fused(torch.ones(2)).tolist() == [2.0, 2.0]
    assert fused.failed and "compiling untraceable failed" in caplog.text
    assert fused(torch.zeros(1)).tolist() == [1.0]  # and stays eager


def test_compiling_is_set_per_process_and_the_environment_decides_first(monkeypatch):
    monkeypatch.delenv(int4.COMPILE_ENV, raising=False)
    monkeypatch.setattr(int4, "_compile_prompts", True)
    assert int4.compiling_prompts()
    int4.compile_prompts(False)
    assert not int4.compiling_prompts()
    monkeypatch.setenv(int4.COMPILE_ENV, "1")
    assert int4.compiling_prompts()
    monkeypatch.setenv(int4.COMPILE_ENV, "0")
    int4.compile_prompts(True)
    assert not int4.compiling_prompts()


def test_the_gated_mlp_reads_a_prompt_as_its_projections_would(int4_tiny, monkeypatch):
    """The MLP's fused prompt path (gate and up products, gating and quantization in one
    pass) stays within 3% of running its three int8 projections one by one."""
    mlp = int4_tiny.model.model.layers[0].mlp
    assert type(mlp).__name__ == "GatedInt4MLP"
    torch.manual_seed(2)
    x = torch.randn(1, MAX_INVARIANT_QUERIES + 20, mlp.gate_proj.in_features).bfloat16()
    with torch.inference_mode():
        fused = mlp(x).float()
        step_by_step = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()
        short = x[:, :3]  # a decode step or verify: the 4-bit kernels, as before
        assert torch.equal(mlp(short), mlp.down_proj(mlp.act_fn(mlp.gate_proj(short)) * mlp.up_proj(short)))
    assert ((fused - step_by_step).norm() / step_by_step.norm()) < 0.03


def test_lossless_methods_equal_greedy_after_a_long_prompt(int4_tiny):
    """Prompts past MAX_INVARIANT_QUERIES tokens are read in 8 bits; every method reads
    them the same way, so llma stays greedy's."""
    int4_tiny.method_state.clear()
    vocab = len(int4_tiny.tokenizer)
    for seed in range(3):
        prompt = [t for p in random_prompts(vocab, 8, seed=seed) for t in p][:MAX_INVARIANT_QUERIES * 2]
        assert len(prompt) > MAX_INVARIANT_QUERIES
        greedy = int4_tiny.generate(prompt, GenerationParams(max_new_tokens=24, method="greedy"))
        llma = int4_tiny.generate(prompt, GenerationParams(max_new_tokens=24, method="llma"), [int4_tiny.decode_text(prompt)])
        assert llma.token_ids == greedy.token_ids


def test_the_batch_schedulers_thread_reads_long_prompts_compiled_as_a_caller_does(int4_tiny, monkeypatch):
    """A server's prompts are read on the batch scheduler's own thread: the compiled prompt
    path runs there and gives the tokens the caller's thread gets."""
    monkeypatch.setenv(int4.COMPILE_ENV, "1")
    vocab = len(int4_tiny.tokenizer)
    prompts = [[t for p in random_prompts(vocab, 8, seed=seed) for t in p][: MAX_INVARIANT_QUERIES + 40] for seed in (7, 8)]
    params = GenerationParams(max_new_tokens=12, method="greedy")
    alone = [int4_tiny.generate(prompt, params).token_ids for prompt in prompts]
    int4_tiny.start_batching(max_batch=2)
    try:
        batched = [int4_tiny.generate(prompt, params).token_ids for prompt in prompts]
    finally:
        int4_tiny.stop_batching()
    assert batched == alone
    assert not int4._quantize_rows.failed and not int4._gated_codes.failed


def test_every_row_of_a_verify_equals_a_one_token_step(int4_tiny):
    """The property lossless methods rest on: logits of a forward over k tokens equal,
    bit for bit, those of the k one-token forwards."""
    model = int4_tiny.model
    prompt = random_prompts(len(int4_tiny.tokenizer), 1, seed=3)[0] + [5, 9, 11]
    with torch.inference_mode():
        cache = new_cache(model)
        model(torch.tensor([prompt[:-8]]), past_key_values=cache, use_cache=True)
        alone = copy.deepcopy(cache)
        batched = model(torch.tensor([prompt[-8:]]), past_key_values=cache, use_cache=True).logits[0]
        singles = torch.cat([model(torch.tensor([[t]]), past_key_values=alone, use_cache=True).logits[0] for t in prompt[-8:]])
    assert torch.equal(batched, singles)


@pytest.mark.parametrize("method", ["llma", "free-lossless"])
def test_lossless_methods_equal_greedy_in_int4(int4_tiny, method):
    options = {"exit_layer": 1, "exit_threshold": 0.2, "adaptive": False} if method == "free-lossless" else {}
    int4_tiny.method_state.clear()
    for prompt in random_prompts(len(int4_tiny.tokenizer), 6, seed=11):
        reference = int4_tiny.decode_text(prompt)  # the prompt itself: llma drafts from it
        greedy = int4_tiny.generate(prompt, GenerationParams(max_new_tokens=24, method="greedy"))
        ours = int4_tiny.generate(prompt, GenerationParams(max_new_tokens=24, method=method, options=options), [reference])
        assert ours.token_ids == greedy.token_ids


def test_the_configuration_is_named_and_refused_where_it_cannot_run(int4_tiny, tiny_generator):
    assert weights_name(int4_tiny.model) == INT4 and weights_name(tiny_generator.model) == "float32"
    assert torch_dtype("int4") == torch.bfloat16
    with pytest.raises(ValueError, match="starts from a bfloat16 model"):
        quantize_model(copy.deepcopy(tiny_generator.model))
    with pytest.raises(ValueError, match="float32, bfloat16, int4"):
        torch_dtype("int8")


def test_int4_gets_its_own_cost_curve(int4_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path))
    forward_cost(int4_tiny.model, "tiny")
    assert [p.name.split("-")[:2] for p in (tmp_path / "costs").iterdir()] == [["tiny", "int4"]]


def test_int4_smollm2_llma_equals_greedy_on_copying_prompts(weights):
    """smollm2-135m in int4: llma, which copies spans of the passage here, gives greedy's
    tokens on every prompt."""
    generator = Generator.load(weights("smollm2-135m-instruct"), "int4")
    assert type(generator.model.lm_head).__name__ == "Int4Linear"
    passages = [
        "The Amazon River in South America is the largest river by discharge volume of water in the world.",
        "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa, about 5,895 metres tall.",
    ]
    for passage in passages:
        prompt = generator.prompt_ids(f"Passage: {passage}\nRepeat the passage's first sentence, then say what it is about.")
        greedy = generator.generate(prompt, GenerationParams(max_new_tokens=32, method="greedy"))
        llma = generator.generate(prompt, GenerationParams(max_new_tokens=32, method="llma"), [passage])
        assert llma.token_ids == greedy.token_ids
        assert llma.stats.accepted_tokens > 0


def test_the_pipeline_commands_load_int4_unless_told_otherwise(weights):
    """ask, chat and serve answer with the int4 configuration by default; --dtype picks another."""
    from ragdec.app.cli import build_parser
    from ragdec.app.cli_common import DEFAULT_DTYPE, build_engine

    model = weights("smollm2-135m-instruct")
    assert DEFAULT_DTYPE == INT4
    default = build_engine(build_parser().parse_args(["ask", "Why?", "--model", model]))
    assert weights_name(default.generator.model) == INT4
    chosen = build_engine(build_parser().parse_args(["serve", "--model", model, "--dtype", "float32"]))
    assert weights_name(chosen.generator.model) == "float32"
