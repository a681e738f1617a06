"""Batch-invariant attention (ragdec/decoding/attention.py): in bfloat16 the attention no
longer makes a position's logits depend on how many positions are verified with it; and it
computes what sdpa computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_causal_lm
from ragdec.decoding.attention import INVARIANT, use_invariant_attention
from ragdec.decoding.generator import Generator

PROMPT = [5, 17, 33, 2, 90, 41, 7, 7, 120, 64, 3, 250, 18, 99, 14, 61]


def _bf16(arch: str, tokenizer, invariant: bool):
    model = tiny_causal_lm(arch, len(tokenizer)).to(torch.bfloat16)
    if invariant:
        use_invariant_attention(model)
    return model


def _qwen_shaped(invariant: bool):
    """Two layers with Qwen 0.5B's attention shape (14 query heads of 64 over 2 key/value
    heads), in bfloat16: where sdpa's many-query kernel departs from its one-query one."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=320, hidden_size=896, intermediate_size=512, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    if invariant:
        use_invariant_attention(model)
    return model


def _next_logits(model, prompt: list[int], extra: int) -> torch.Tensor:
    """The first position's logits after ``prompt`` when ``extra`` more tokens ride along."""
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        ids = [11] + [30 + i for i in range(extra)]
        return model(torch.tensor([ids]), past_key_values=copy.deepcopy(cache), use_cache=True).logits[0, 0].float()


def test_a_positions_logits_do_not_depend_on_the_tokens_verified_with_it():
    prompt = [(7 * i + 3) % 300 + 2 for i in range(40)]
    model = _qwen_shaped(invariant=True)
    assert model.config._attn_implementation == INVARIANT
    alone = _next_logits(model, prompt, 0)
    for extra in (1, 2, 5, 9, 12):
        assert torch.equal(alone, _next_logits(model, prompt, extra)), f"differs with {extra} tokens verified beside it"


def test_the_control_sdpa_changes_bits_with_the_tokens_verified_beside_it():
    """Why the invariant path exists: sdpa on the same weights gives other bits once ten
    tokens are verified, on CPUs whose kernel tiles the queries (AVX-512's); where torch's
    kernel for this CPU does not (AVX2's), there is nothing to show."""
    prompt = [(7 * i + 3) % 300 + 2 for i in range(40)]
    sdpa = _qwen_shaped(invariant=False)
    alone = _next_logits(sdpa, prompt, 0)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip(f"torch's {torch.backends.cpu.get_cpu_capability()} kernels: sdpa's bits may not move here")
    assert not all(torch.equal(alone, _next_logits(sdpa, prompt, extra)) for extra in (9, 12))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_it_computes_what_sdpa_computes(arch, tiny_tokenizer):
    """Same weights in float32: the invariant path and sdpa agree to float rounding, for a
    prefill (sdpa itself), a decode step and a verify of several tokens on a padded batch."""
    sdpa = tiny_causal_lm(arch, len(tiny_tokenizer))
    invariant = copy.deepcopy(sdpa)
    use_invariant_attention(invariant)
    ids = torch.tensor([[1, 1, 1] + PROMPT[:13], PROMPT])  # row 0 left-padded
    mask = torch.tensor([[0] * 3 + [1] * 13, [1] * 16])
    outs = []
    for model in (sdpa, invariant):
        with torch.inference_mode():
            cache = DynamicCache()
            first = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            step_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], -1)
            step = model(torch.tensor([[9, 8, 7, 6], [5, 4, 3, 2]]), attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
        outs.append((first, step))
    for a, b in zip(*outs):
        assert torch.allclose(a[:, -4:], b[:, -4:], atol=1e-4, rtol=1e-4)


def test_generator_load_uses_it_for_16_bit_weights_only(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2", len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    assert Generator.load(str(tmp_path / "tiny"), "bfloat16").model.config._attn_implementation == INVARIANT
    assert Generator.load(str(tmp_path / "tiny")).model.config._attn_implementation == "sdpa"
