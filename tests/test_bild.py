"""BiLD: rollback_threshold 0 and the lossless mode equal the big model's greedy output; the
lossy mode keeps only tokens the big model finds likely; both KV caches stay consistent."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TRAINING_TEXT, tiny_causal_lm
from helpers import noisy_copy, random_prompts
from ragdec.decoding import loop
from ragdec.decoding.bild import LittleModelDrafter, RollbackRule
from ragdec.decoding.generator import Generator
from ragdec.decoding.kv import kv_len, new_cache
from ragdec.decoding.methods import GenerationParams, method_factory
from ragdec.decoding.stopping import StopCondition
from ragdec.models.zoo import model_status

PADDING_ROWS = 7  # the little model's embedding is padded past the tokenizer, as Qwen's is


@pytest.fixture(scope="module")
def pair(tiny_tokenizer) -> tuple[Generator, Generator]:
    """(big, little) sharing tiny_tokenizer; the little one's padding logits win unless sliced.

    Llama, not the tied-embedding Qwen2 of conftest: that one repeats one token with
    probability 1, so its drafts would always stand and never roll back."""
    vocab = len(tiny_tokenizer)
    big = tiny_causal_lm("llama", vocab)
    with torch.no_grad():  # sharper logits: top probabilities around 0.6, as a real model's
        big.lm_head.weight.mul_(40.0)
    little = noisy_copy(big, noise=0.2)
    little.resize_token_embeddings(vocab + PADDING_ROWS, mean_resizing=False)
    padding = torch.arange(vocab, vocab + PADDING_ROWS)
    little.get_output_embeddings().register_forward_hook(lambda module, args, out: out.index_fill(-1, padding, 1e4))
    return Generator(big, tiny_tokenizer, "tiny-big"), Generator(little, tiny_tokenizer, "tiny-little")


def run(big: Generator, little: Generator, prompt, method="bild", max_new_tokens=30, stop=(), **options):
    params = GenerationParams(max_new_tokens, tuple(stop), method, {"draft_model": little, **options})
    return big.generate(prompt, params)


def greedy(big: Generator, prompt, max_new_tokens=30, stop=()):
    return big.generate(prompt, GenerationParams(max_new_tokens, tuple(stop)))


def test_rollback_threshold_zero_equals_big_greedy(pair):
    big, little = pair
    drafted = 0
    for prompt in random_prompts(len(big.tokenizer), 4, seed=3):
        ours = run(big, little, prompt, max_new_tokens=24, rollback_threshold=0.0, fallback_threshold=0.3, max_draft=3)
        assert ours.token_ids == greedy(big, prompt, max_new_tokens=24).token_ids
        drafted += ours.stats.drafted_tokens
    assert drafted > 0  # drafts were made and rolled back


@pytest.mark.parametrize("fallback_threshold,max_draft", [(0.0, 4), (0.6, 10)])
def test_lossless_equals_big_greedy(pair, fallback_threshold, max_draft):
    big, little = pair
    drafted = accepted = 0
    for i, prompt in enumerate(random_prompts(len(big.tokenizer), 6, seed=4)):
        stop = ()
        if i % 2:  # a stop string taken from the greedy answer, so that a draft can cross it
            text = greedy(big, prompt).text
            stop = (text[6:8],) if len(text) > 8 else ()
        expected = greedy(big, prompt, stop=stop)
        ours = run(big, little, prompt, "bild-lossless", stop=stop, fallback_threshold=fallback_threshold, max_draft=max_draft)
        assert (ours.token_ids, ours.text, ours.finish_reason) == (expected.token_ids, expected.text, expected.finish_reason)
        assert ours.stats.drafter_forward_passes > 0
        drafted, accepted = drafted + ours.stats.drafted_tokens, accepted + ours.stats.accepted_tokens
    assert accepted > 0  # the little model's drafts stood sometimes
    assert accepted < drafted  # and were cut sometimes


def test_an_unsure_little_model_leaves_every_token_to_the_big_one(pair):
    """fallback_threshold above 1: no draft ever, the big model decodes each token (greedy);
    the little model still reads the prompt and each new token, one forward each."""
    big, little = pair
    prompt = random_prompts(len(big.tokenizer), 1, seed=8)[0]
    ours = run(big, little, prompt, max_new_tokens=12, fallback_threshold=1.01)
    assert ours.token_ids == greedy(big, prompt, max_new_tokens=12).token_ids
    assert ours.stats.drafted_tokens == 0 and ours.stats.forward_passes == len(ours.token_ids)
    # the prompt, then one token per step that had room for a draft (all but the last)
    assert ours.stats.drafter_forward_passes == 1 + len(ours.token_ids) - 2


def test_lossy_mode_keeps_only_tokens_the_big_model_finds_likely(pair):
    """Every token of the answer is the big model's argmax, or a little-model token whose
    cross-entropy under the big model is at most rollback_threshold."""
    big, little = pair
    threshold, differs = 2.0, 0
    for prompt in random_prompts(len(big.tokenizer), 6, seed=5):
        ours = run(big, little, prompt, rollback_threshold=threshold, fallback_threshold=0.3)
        sequence = torch.tensor([[*prompt, *ours.token_ids]])
        with torch.inference_mode():
            logits = big.model(input_ids=sequence).logits[0, len(prompt) - 1 : -1]  # [new, vocab]
        cross_entropy = -torch.log_softmax(logits, dim=-1)[torch.arange(len(ours.token_ids)), list(ours.token_ids)]
        is_argmax = logits.argmax(dim=-1) == torch.tensor(ours.token_ids)
        assert bool((is_argmax | (cross_entropy <= threshold + 1e-4)).all())
        differs += int((~is_argmax).sum())
    assert differs > 0  # the lossy path really kept tokens greedy would not


def test_rollback_rule_cuts_at_the_first_unlikely_token():
    logits = torch.full((4, 6), -10.0)
    logits[0, 5] = logits[1, 2] = logits[2, 3] = logits[3, 1] = 5.0  # argmax per row: 5, 2, 3, 1
    logits[1, 4] = 4.0  # p_big(4) at row 1 is about 0.27: cross-entropy 1.3
    rule = RollbackRule(rollback_threshold=2.0)
    assert rule.accept([5, 4, 3], logits) == [5, 4, 3, 1]  # all stand, plus the bonus token
    assert rule.accept([5, 4, 0], logits) == [5, 4, 3]  # 0 is unlikely at row 2: the big model's 3
    assert RollbackRule(1.0).accept([5, 4, 3], logits) == [5, 2]  # 1.3 > 1.0: cut at 4
    assert rule.accept([], logits[:1]) == [5]  # fallback only: the big model's token


def _assert_cache_holds(model, cache, tokens):
    """``cache`` holds the keys and values a fresh prefill of ``tokens`` gives."""
    fresh = new_cache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([list(tokens)]), past_key_values=fresh, use_cache=True)
    assert kv_len(cache) == kv_len(fresh) == len(tokens)
    for ours, expected in zip(cache.layers, fresh.layers):
        assert torch.allclose(ours.keys, expected.keys, atol=1e-4)
        assert torch.allclose(ours.values, expected.values, atol=1e-4)


def test_both_caches_consistent_after_rollbacks(pair, monkeypatch):
    big, little = pair
    big_caches = []

    def recording_new_cache(model):
        big_caches.append(new_cache(model))
        return big_caches[-1]

    monkeypatch.setattr(loop, "new_cache", recording_new_cache)
    steps = cut = 0
    for prompt in random_prompts(len(big.tokenizer), 3, seed=6):
        params = GenerationParams(30, (), "bild", {"draft_model": little, "rollback_threshold": 1.0, "fallback_threshold": 0.0})
        drafter, rule = method_factory("bild")(big, prompt, [], params)
        assert isinstance(drafter, LittleModelDrafter) and drafter.cached_tokens == list(prompt)
        observe = drafter.observe

        def checked_observe(tokens, drafted, accepted):
            nonlocal steps, cut
            observe(tokens, drafted, accepted)
            # the little cache holds a prefix of what stands, nothing rolled back
            assert drafter.cached_tokens == list(tokens[: len(drafter.cached_tokens)])
            assert kv_len(drafter.cache) == len(drafter.cached_tokens) >= len(tokens) - 2
            steps, cut = steps + 1, cut + (accepted < drafted)

        drafter.observe = checked_observe
        stop = StopCondition(frozenset(), (), 30)  # no EOS: the answer runs to the budget
        row = loop.Row(tokens=list(prompt), prompt_len=len(prompt), drafter=drafter, acceptance=rule, stop=stop,
                       detokenize=big.decode_text)
        blocks = list(loop.decode(big.model, row))
        generated = [t for block in blocks for t in block.token_ids]
        assert blocks[-1].finish_reason == "length" and len(generated) == 30
        _assert_cache_holds(little.model, drafter.cache, drafter.cached_tokens)
        # the big cache holds every token but the last, which the next verify would read
        _assert_cache_holds(big.model, big_caches[-1], [*prompt, *generated][:-1])
    assert cut > 0 and steps > 0  # rollbacks happened


def test_pair_with_another_vocabulary_is_refused(pair, tiny_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    big, little = pair
    # the same text and size, the special tokens in the other order: ids 0 and 1 swap meaning
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(tiny_tokenizer), special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TRAINING_TEXT * 20, trainer)
    other = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    assert len(other) == len(tiny_tokenizer) and other.get_vocab() != tiny_tokenizer.get_vocab()
    stranger = Generator(little.model, other, "stranger")
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        run(big, stranger, [5, 6, 7], max_new_tokens=4)


def test_no_little_model_and_unknown_options_are_refused(pair):
    big, little = pair
    with pytest.raises(ValueError, match="no little model is paired"):
        big.generate([5, 6, 7], GenerationParams(4, method="bild"))
    with pytest.raises(ValueError, match="unknown bild option"):
        run(big, little, [5, 6, 7], max_new_tokens=4, fallback_treshold=0.5)  # a typo
    # another method's knob passes (the router sends one set of options to whichever
    # method it picks): llma's copy_k changes nothing here
    assert run(big, little, [5, 6, 7], max_new_tokens=6, copy_k=4).token_ids == run(big, little, [5, 6, 7], max_new_tokens=6).token_ids


def test_int8_little_model_drafts_and_lossless_stays_lossless(pair):
    """The int8 drafter (the default for a little model loaded by name) proposes other
    tokens than the float one at times; the big model still decides."""
    from ragdec.decoding.bild import quantize_int8

    big, little = pair
    quantized = Generator(quantize_int8(little.model), little.tokenizer, "tiny-little-int8")
    assert type(quantized.model.lm_head).__module__.startswith("torch.ao.nn.quantized")
    assert type(little.model.lm_head) is torch.nn.Linear  # the float model is untouched
    for prompt in random_prompts(len(big.tokenizer), count=4, seed=3):
        expected = greedy(big, prompt).token_ids
        assert run(big, quantized, prompt, method="bild-lossless").token_ids == expected
        assert run(big, quantized, prompt, rollback_threshold=0.0).token_ids == expected


def test_smollm2_drafting_for_itself_equals_greedy(smollm2, tmp_path):
    """A real model as its own little model (by zoo name, loaded once): every confident
    draft stands, so both modes give greedy's tokens, and most tokens come from drafts."""
    from ragdec.app.cli import main

    for prompt in ("What is the capital of France?", "Name three primary colors."):
        ids = smollm2.prompt_ids(prompt)
        expected = smollm2.generate(ids, GenerationParams(16))
        for method in ("bild", "bild-lossless"):
            # float drafts (the int8 default may propose other tokens, which lossy bild may keep)
            options = {"draft_model": "smollm2-135m-instruct", "draft_int8": False}
            params = GenerationParams(16, method=method, options=options)
            ours = smollm2.generate(ids, params)
            assert ours.token_ids == expected.token_ids, method
            assert ours.stats.accepted_tokens >= ours.stats.new_tokens // 2
    out = tmp_path / "bild.json"
    code = main([
        "generate", "--model", "smollm2-135m-instruct", "--method", "bild", "--draft-model", "smollm2-135m-instruct",
        "--rollback-threshold", "3", "--prompt", "What is the capital of France?", "--max-new-tokens", "6", "--json", str(out),
    ])
    assert code == 0
    stats = json.loads(out.read_text())["stats"]
    assert stats["drafter_forward_passes"] > 0 and stats["new_tokens"] > 0


@pytest.mark.skipif(
    not all(model_status(n) == "prepared" for n in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")),
    reason="the real pair is not prepared: ragdec models prepare qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct",
)
def test_real_pair_lossless_and_full_rollback_equal_big_greedy(weights):
    """qwen2.5-coder-1.5b with its zoo little model (int8): both modes that promise the
    big model's output give it token for token, and the router picks bild-lossless for the pair."""
    from ragdec.pipelines.router import default_method

    big = Generator.load(weights("qwen2.5-coder-1.5b-instruct"))
    assert default_method(big.name) == "bild-lossless"
    for prompt in ("Summarize in one sentence: The city council approved a new park on Monday.", "Who wrote Hamlet?"):
        ids = big.prompt_ids(prompt)
        expected = big.generate(ids, GenerationParams(12)).token_ids
        lossless = big.generate(ids, GenerationParams(12, method="bild-lossless"))
        assert lossless.token_ids == expected and lossless.stats.accepted_tokens > 0
        assert big.generate(ids, GenerationParams(12, method="bild", options={"rollback_threshold": 0.0})).token_ids == expected
