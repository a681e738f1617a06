"""BiLD (Big Little Decoder): a little model drafts while it is sure; the big model falls back and rolls back.

Kim et al., "Speculative Decoding with Big Little Decoder" (NeurIPS 2023), on the one loop:

1. fallback: the little model decodes autoregressively while its top probability stays
   >= ``fallback_threshold`` (at most ``max_draft`` tokens). Where it hesitates, the big
   model takes over: the loop's verify runs it once, non-autoregressively, over every
   token it has not seen (``[last, *draft]``), and its last row decodes the hesitant
   position itself. An empty draft is the pure fallback: the big model decodes one token.
2. rollback (``bild``): the big model's logits over the draft give, for each little
   token, its cross-entropy -log p_big(token); at the first one above
   ``rollback_threshold`` the draft is cut and the big model's own token stands there.
   Tokens the big model finds merely plausible stand, so the output may differ from the
   big model's greedy output, with little loss: the speed-with-minimal-loss mode.
3. lossless (``bild-lossless``): a draft token stands only where it equals the big
   model's argmax (``greedy.ExactMatch``), so the output is the big model's greedy output.

Both models keep a KV cache. The loop crops the big one; the little one is cropped here
to the tokens that stand after each step, and what it has not seen (the big model's
token, a draft token it never had to read) is fed on the next proposal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .greedy import ExactMatch
from .kv import crop_to, new_cache
from .methods import knob, method_config, method_options, register_method
from .seam import Drafter

# big model (zoo name) -> its little model: the same family, so the same tokenizer
LITTLE_MODELS = {"qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-0.5b-instruct"}

# bild-lossless: fallback 0.6, the paper's; 0.5 and 0.7 do about as well, while 0.3 drafts
# long runs that a float32 verify pays for and rejects, slower than greedy
# (bench/results/bild_sweep_xsum.json)
LOSSLESS_DEFAULTS = {"fallback_threshold": 0.6}


@method_options("bild", LOSSLESS_DEFAULTS)
@dataclass(frozen=True)
class BiLDConfig:
    # Below it the little model's token is not trusted and the big model decodes. From the
    # sweep on XSum (bench/results/bild_sweep_xsum.json, 1.5B/0.5B, float32, 2 cores): 0.3
    # for bild, which with rollback 3 is the fastest setting there and keeps ROUGE-L against
    # the gold summaries at greedy's or above; bild-lossless uses LOSSLESS_DEFAULTS.
    fallback_threshold: float = knob(0.3, "the little model drafts while its top probability is at least this")
    # A little token stands while p_big(token) >= exp(-rollback_threshold). The paper's code
    # uses about 2 to 5; the sweep: 1 gives back greedy's output at no gain, 2 to 3 keep
    # ROUGE-L, 5 drifts (agreement with greedy falls to 0.63).
    rollback_threshold: float = knob(3.0, "a draft token rolls back where the big model's cross-entropy of it exceeds this")
    # 20 as transformers' assisted decoding; on summaries the little model stays sure for
    # long runs (probe: 6.9 tokens per big forward at 20 against 5.9 at 10)
    max_draft: int = knob(20, "most little-model steps before the big model verifies")
    # zoo name, folder or hub id, or a loaded Generator; None: LITTLE_MODELS
    draft_model: object = knob(None, "the little model, sharing the big model's tokenizer (default: the zoo's pair)")
    # dynamic quantization: a little-model step reads a quarter of float32's weight bytes,
    # which is what a CPU step's time follows. It only drafts: the big model decides what stands, so bild-lossless stays
    # lossless.
    draft_int8: bool = knob(True, "the little model's linear layers in int8 when it is loaded by name")


class LittleModelDrafter(Drafter):
    """Drafts with the little model while its top probability stays >= fallback_threshold.

    ``cached_tokens`` are exactly the tokens whose KV ``cache`` holds. Example: prompt
    [p1 p2] is prefilled; the big model's first token is t1. propose([p1 p2 t1]) feeds t1,
    drafts d1 (p 0.9) and d2 (p 0.8), feeds them, sees p 0.4 for the next token and stops:
    draft [d1 d2], cache [p1 p2 t1 d1 d2]. The big model rolls back at d2 and decodes b2:
    observe([p1 p2 t1 d1 b2]) crops the cache to [p1 p2 t1 d1]; the next propose feeds b2.
    """

    def __init__(self, model, vocab_size: int, config: BiLDConfig, eos_token_ids=frozenset()):
        self.model = model
        self.vocab_size = vocab_size  # the shared vocabulary; logits past it are padding rows
        self.config = config
        self.eos_token_ids = eos_token_ids  # a draft ends after one: nothing follows it
        self.cache = new_cache(model)
        self.cached_tokens: list[int] = []
        self.forward_passes = 0  # the little model's (the contract's)

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Read the prompt before decoding starts, as the big model does."""
        self._crop(_common_prefix_len(self.cached_tokens, prompt_ids))
        if len(self.cached_tokens) < len(prompt_ids):
            self._forward(prompt_ids[len(self.cached_tokens) :])

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        import torch

        limit = min(max_tokens, self.config.max_draft)
        if limit <= 0:
            return []
        # keep every token that stands but the last, whose logits the first draft needs
        self._crop(min(_common_prefix_len(self.cached_tokens, tokens), len(tokens) - 1))
        logits = self._forward(tokens[len(self.cached_tokens) :])
        draft: list[int] = []
        while True:
            confidence, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            if confidence.item() < self.config.fallback_threshold:
                break  # fallback: the big model decodes this position
            draft.append(int(token))
            if len(draft) == limit or draft[-1] in self.eos_token_ids:
                break
            logits = self._forward(draft[-1:])
        return draft

    def observe(self, tokens: Sequence[int], drafted: int, accepted: int) -> None:
        # drop the draft tokens that did not stand; the big model's token is fed lazily
        self._crop(_common_prefix_len(self.cached_tokens, tokens))

    def _forward(self, new_tokens: Sequence[int]):
        """Feed ``new_tokens`` (at least one) into the cache; the logits after the last, [vocab]."""
        import torch

        input_ids = torch.tensor([list(new_tokens)], dtype=torch.long)  # [1, n]
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.forward_passes += 1
        self.cached_tokens.extend(new_tokens)
        return out.logits[0, -1, : self.vocab_size]

    def _crop(self, length: int) -> None:
        crop_to(self.cache, length)
        del self.cached_tokens[length:]


class RollbackRule:
    """BiLD's rollback policy: keep the little model's tokens up to the first that the big
    model finds unlikely; there, the big model's own token stands.

    Example: rollback_threshold 2.0 (a token stands while p_big >= e^-2 = 0.14); draft
    [5, 9, 4] with p_big 0.9, 0.3, 0.05, so cross-entropy 0.1, 1.2, 3.0: 4 exceeds 2.0, the
    draft is cut there and the big model's argmax at that row, say 7, replaces it: [5, 9, 7].
    Had 4 had p_big 0.5, all three would stand with the big model's next token: [5, 9, 4, b].
    With rollback_threshold 0 every token the big model does not give probability 1 rolls
    back, which is the big model's greedy output.
    """

    def __init__(self, rollback_threshold: float):
        self.rollback_threshold = rollback_threshold

    def accept(self, draft: Sequence[int], logits) -> list[int]:
        import torch

        predicted = logits.argmax(dim=-1).tolist()  # [k + 1]
        cut = len(draft)
        if draft:
            log_probs = torch.log_softmax(logits[: len(draft)].float(), dim=-1)  # [k, vocab]
            cross_entropy = -log_probs[torch.arange(len(draft)), torch.tensor(list(draft))]  # [k]
            over = (cross_entropy > self.rollback_threshold).nonzero()
            if len(over):
                cut = int(over[0, 0])
        return [*draft[:cut], predicted[cut]]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case, compared at C speed
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


@lru_cache(maxsize=2)
def load_little(name_or_path: str, int8: bool = True):
    """The little model, loaded once per process. Not in ``generator.method_state``: the
    benchmark gives each method its own state, and bild, bild-lossless and a pipeline
    should share one copy of the weights, not load one each.

    ``int8``: a copy with its ``nn.Linear`` layers (LM head included) as dynamically
    quantized int8 layers (weights int8, activations quantized per step), which reads a quarter of
    the bytes per step; on CPUs without int8 kernels the float32 model is kept.
    """
    from .generator import Generator

    little = Generator.load(name_or_path)
    if int8:
        little.model = quantize_int8(little.model, inplace=True)  # nobody else holds this copy
    return little


def quantize_int8(model, inplace: bool = False):
    """``model`` with dynamically quantized int8 linear layers (a copy unless ``inplace``),
    or ``model`` itself where this torch build has no quantized engine (the result only
    drafts, so either is correct)."""
    import copy
    import warnings

    import torch

    if not torch.backends.quantized.supported_engines or torch.backends.quantized.supported_engines == ["none"]:
        return model
    quantized = (model if inplace else copy.deepcopy(model)).float()  # int8 kernels take float32 activations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's notice that it moves to torchao
        return torch.ao.quantization.quantize_dynamic(quantized, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def shared_vocab_size(big, little, little_name: str = "the little model") -> int:
    """How many token ids both models read alike; refuse a pair whose tokenizers differ.

    Sizes alone do not tell: models of one family pad the embedding past the tokenizer
    (Qwen2.5: 151,665 tokens, 151,936 rows), and two tokenizers of one size can map ids
    to different text. The little model's logits are sliced to the returned size.
    """
    big_vocab, little_vocab = big.tokenizer.get_vocab(), little.tokenizer.get_vocab()
    if big_vocab != little_vocab:
        differing = sum(1 for token, i in little_vocab.items() if big_vocab.get(token) != i)
        raise ValueError(
            f"bild: {little_name} and {big.name or 'the big model'} do not share a vocabulary "
            f"({len(little_vocab)} vs {len(big_vocab)} tokens, {differing} of the little model's tokens differ): "
            f"pick a little model of the big model's family (--draft-model); the zoo pairs "
            + ", ".join(f"{b} -> {s}" for b, s in LITTLE_MODELS.items())
        )
    rows = [m.get_input_embeddings().weight.shape[0] for m in (big.model, little.model)]  # int8 heads hide theirs
    return min(len(big.tokenizer), *rows)


def _drafter(generator, prompt_ids: Sequence[int], config: BiLDConfig) -> LittleModelDrafter:
    """The little model named by the options (or paired with the big one), checked, prompt read."""
    draft_model = config.draft_model or LITTLE_MODELS.get(Path(generator.name).name)
    if draft_model is None:
        raise ValueError(
            f"bild: no little model is paired with {generator.name!r}: name one that shares its tokenizer "
            f"(--draft-model, option draft_model), or use a big model the zoo pairs: "
            + ", ".join(f"{b} -> {s}" for b, s in LITTLE_MODELS.items())
        )
    if isinstance(draft_model, str):
        little = load_little(draft_model, config.draft_int8)
        checked = generator.method_state.setdefault("bild-vocab", {})  # little name -> shared size
        if draft_model not in checked:
            checked[draft_model] = shared_vocab_size(generator, little, draft_model)
        vocab_size = checked[draft_model]
    else:  # a loaded Generator (tests, programs that hold both models)
        little = draft_model
        vocab_size = shared_vocab_size(generator, little, little.name)
    drafter = LittleModelDrafter(little.model, vocab_size, config, generator.eos_token_ids)
    drafter.prefill(prompt_ids)
    return drafter


def bild_config(options, method: str = "bild") -> BiLDConfig:
    return method_config(BiLDConfig, options, method, LOSSLESS_DEFAULTS if method == "bild-lossless" else {})


@register_method("bild")
def _bild(generator, prompt_ids, references, params):
    config = bild_config(params.options, "bild")
    return _drafter(generator, prompt_ids, config), RollbackRule(config.rollback_threshold)


@register_method("bild-lossless", lossless=True)
def _bild_lossless(generator, prompt_ids, references, params):
    return _drafter(generator, prompt_ids, bild_config(params.options, "bild-lossless")), ExactMatch()
