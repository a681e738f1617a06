"""FREE: early exit from the first layers, synchronized parallel decoding, an adaptive threshold.

One model, no second set of weights (Bae et al., 2023, "Fast and Robust Early-Exiting
Framework for Autoregressive Language Models with Synchronized Parallel Decoding"):

- The *shallow model* is the first ``exit_layer`` layers plus an exit head (a small
  trained adapter, then the model's own final norm and LM head); the *deep model* is all
  layers. ``ShallowDeep`` runs both on the HF model's own layers and one ``DynamicCache``,
  so layer i's KV for every position lives in the cache's layer i, whichever pass wrote it.
- Tokens whose shallow confidence (top softmax probability) reaches ``exit_threshold``
  leave after the shallow layers; their exit-layer hidden states are *stacked*. The next
  token that does not exit runs the deep layers over the whole stack in one pass, which
  writes the stacked tokens' real deep-layer keys and values (no state copying), and the
  shallow layers' KV is never recomputed.

It fits the draft-and-verify seam with ``ShallowDeep`` standing in for the target model:
the drafter (``ShallowExitDrafter``) proposes the exited tokens, running only the shallow
layers; the loop's verify over ``[last, *draft]`` then reaches ``ShallowDeep.__call__``,
which takes the stacked hidden states instead of recomputing the first layers and runs
only the deep layers. Two acceptance rules (``FreeAcceptance``):

- ``free`` (lossy, the paper's): the exited tokens stand as the shallow head emitted them;
  the deep pass gives the stack its deep KV and the next token.
- ``free-lossless`` (self-speculative): the deep pass verifies the stack; the longest
  prefix equal to the deep argmax stands, plus the deep model's own next token, and the
  cache is cropped. Output equals plain greedy token for token.

Either way each deep pass yields, for free, pairs (shallow confidence, shallow and deep
agree) at every stacked position; ``ExitThreshold`` (free_threshold.py) fits a Beta
mixture to them and moves ``exit_threshold`` (see there).

Cost, where it goes: a greedy step runs every layer and the whole LM head (for
qwen2.5-coder-0.5b a 152k-row head, a large part of the step). A shallow step runs the
first ``exit_layer`` layers and an exit head that scores only ``exit_vocab`` rows (the
first 16,384 token ids and the prompt's tokens, a tenth of the head's multiply-adds). The
deep pass over a stack of 1 to 3 tokens costs about what one token's does, because on
these CPUs a float32 matmul with 2 or 3 rows costs what one row does; with 4 rows or more
the head takes a slower kernel, so the deep pass runs it 3 rows at a time. An exit
therefore saves at most the deep part of a step (the layers past ``exit_layer``): FREE on
a frozen model can at best approach the ratio of a full step to a shallow one at a 100%
exit rate, and it gets what the exit rate gives.

What limits it is agreement, and where it lives. Calibrated on the model's own answers
(``ragdec free calibrate``), the exit head of qwen2.5-coder-0.5b agrees with the deep model
on about a third of held-out positions at layers 12 to 16 and on most of them from layer 17
(bench/results/free_calibration_*.json). With those exits FREE runs close to greedy's
speed, a little above it on 0.5B and around it on 1.5B (bench/results/free_*.json). The
paper fine-tunes the whole model for its exits; an adapter on frozen layers only finds
what the layers already know.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from .free_threshold import ExitThreshold
from .greedy import ExactMatch
from .methods import knob, method_config, method_options, register_method
from .seam import Drafter

# free-lossless: the deep pass checks every draft. A wrong one costs its shallow step and
# ends the draft; a right one saves the deep part of a step, which on qwen2.5-coder-0.5b
# at layer 17 is a little less than the shallow step, so a draft pays from about 0.6. Of
# 0.5, 0.65 and 0.8, 0.8 was the fastest on XSum
# (bench/results/free_posterior_sweep_xsum.json, where plain free-lossless is 0.5).
LOSSLESS_DEFAULTS = {"agree_posterior": 0.8}


@method_options("free", LOSSLESS_DEFAULTS)
@dataclass(frozen=True)
class FreeConfig:
    # None: default_exit_layer
    exit_layer: int | None = knob(None, "layers in the shallow model (default auto: a trained model's own, else 0.7 of the depth, 17 of 24)")
    exit_threshold: float = knob(0.9, "shallow confidence needed to exit; the adaptive threshold's start")
    adaptive: bool = knob(True, "move the exit threshold with a Beta mixture fitted to the deep passes' agreement")
    # 0.9 for free, where an exited token stands unchecked, so it must be right;
    # free-lossless uses LOSSLESS_DEFAULTS.
    agree_posterior: float = knob(0.9, "adaptive: exit where P(shallow agrees with deep | confidence) reaches this")
    max_stack: int = knob(16, "most tokens stacked before a deep pass is forced")
    exit_vocab: int = knob(16384, "the exit head scores these first token ids and the prompt's; 0: all")
    adapter: str | None = knob(None, "exit adapter file (default: $RAGDEC_HOME/free/<model>/layer<L>.safetensors if saved)")


HEAD_ROWS = 3  # positions per LM-head matmul in the deep pass (see ShallowDeep.__call__)


def free_config(options, lossless: bool = False) -> FreeConfig:
    return method_config(FreeConfig, options, "free", LOSSLESS_DEFAULTS if lossless else {})


EXIT_DEPTH = 0.7


def default_exit_layer(depth: int) -> int:
    """The exit layer when none is given: 0.7 of the depth (17 of qwen2.5-coder-0.5b's 24).

    On qwen2.5-coder-0.5b with adapters calibrated on its own answers, the held-out top-1
    agreement of the exit head with the deep model jumps between layers 16 and 17 and
    creeps after (bench/results/free_calibration_*.json), while each layer more costs the
    shallow step one layer's share of a greedy step; 17 is the first layer past the jump.
    """
    return max(1, min(depth - 1, round(depth * EXIT_DEPTH)))


# ---- the shallow-deep module -------------------------------------------------------------


def exit_adapter(hidden_size: int, rank: int = 64):
    """The exit head's trainable part: ``h + up(down(h))``, a low-rank residual on the
    exit layer's hidden state. ``up`` starts at zero, so an untrained adapter is the
    identity and the exit head is the naive one (final norm + LM head on layer L)."""
    import torch
    from torch import nn

    class ExitAdapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(hidden_size, rank, bias=False)
            self.up = nn.Linear(rank, hidden_size, bias=False)
            nn.init.zeros_(self.up.weight)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden + self.up(self.down(hidden))

    return ExitAdapter()


def safe_model_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")) or "model"


def adapter_path(model_name: str, exit_layer: int) -> Path:
    """Where ``ragdec free calibrate`` saves the adapter of a model at an exit layer."""
    from ragdec.models.home import ragdec_home

    return ragdec_home() / "free" / safe_model_name(model_name) / f"layer{exit_layer}.safetensors"


FREE_META = "ragdec_free.json"  # in a model folder trained for FREE (``ragdec free train``): its exit layer, curve


def trained_exit_layer(name_or_path: str) -> int | None:
    """The exit layer a model folder was trained for (its ``FREE_META``), or None: not a
    folder trained for FREE, or a file that cannot be read."""
    path = Path(str(name_or_path)).expanduser() / FREE_META
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["exit_layer"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_adapter(path: Path, hidden_size: int, dtype=None):
    """An adapter from a safetensors file saved by calibration (its rank read from the file)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    adapter = exit_adapter(hidden_size, rank=state["down.weight"].shape[0])
    adapter.load_state_dict(state)
    return adapter.to(dtype) if dtype is not None else adapter


class ShallowDeep:
    """A Qwen2/Llama-family causal LM split at ``exit_layer``, both halves on one cache.

    Called like the model (``input_ids``, ``past_key_values``, ``logits_to_keep``), it is
    the deep model, except that the first ``len(stack_ids)`` input tokens must be the
    stacked ones: their exit-layer hidden states are taken from the stack, only the rest
    run the shallow layers, then all run the deep layers. With nothing stacked it is the
    plain model (the prefill).

    Example: prompt of 10 tokens prefilled (every layer holds positions 0..9); the last
    token t10 and drafts d1, d2 run the shallow layers one at a time (layers < L now hold
    0..12, layers >= L still 0..9); the verify ``model([t10, d1, d2])`` runs layers >= L
    once over the three stacked hidden states, at positions 10..12.
    """

    def __init__(self, model, exit_layer: int, adapter=None, exit_vocab=None):
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
            raise ValueError("FREE needs a Qwen2/Llama-family causal LM (model.model.layers, model.lm_head)")
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            raise ValueError("FREE supports full-attention layers only (no sliding window)")
        depth = len(base.layers)
        if not 0 < exit_layer < depth:
            raise ValueError(f"exit_layer must be between 1 and {depth - 1} for this {depth}-layer model, got {exit_layer}")
        self.model = model
        self.config = model.config
        self.exit_layer = exit_layer
        self.adapter = adapter
        # the exit head's vocabulary: token ids (a LongTensor) whose LM-head rows it scores,
        # or None for all of them; see ``exit_vocabulary``
        self.exit_vocab = exit_vocab
        self._exit_head = None if exit_vocab is None else model.lm_head.weight.index_select(0, exit_vocab)
        self.stack_ids: list[int] = []  # tokens that ran the shallow layers only, in order
        self._stack_hidden: list = []  # their exit-layer hidden states, [1, 1, hidden] each
        self.cache = None  # the cache of the current request (the last one called with)
        self.shallow_passes = 0  # single-token shallow forwards (the drafter's)

    # 1. the layers, on a slice of the stack of layers and the part of the cache they own
    def _run_layers(self, hidden, start: int, stop: int):
        """Run layers ``start..stop-1`` over ``hidden`` [1, q, hidden_size], appending to
        their cache at the positions that follow what layer ``start`` holds."""
        import torch
        from transformers.masking_utils import create_causal_mask

        base, cache = self.model.model, self.cache
        past = cache.get_seq_length(start)
        positions = torch.arange(past, past + hidden.shape[1]).unsqueeze(0)  # [1, q]
        mask = create_causal_mask(self.config, hidden, None, cache, positions, layer_idx=start)
        rotary = base.rotary_emb(hidden, positions)
        for layer in base.layers[start:stop]:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                past_key_values=cache, use_cache=True,
            )
        return hidden

    def shallow(self, input_ids):
        """Exit-layer hidden states of ``input_ids`` [1, q]: [1, q, hidden_size]."""
        return self._run_layers(self.model.model.embed_tokens(input_ids), 0, self.exit_layer)

    def exit_logits(self, hidden):
        """The exit head: adapter, final norm, LM head (its ``exit_vocab`` rows only).
        [1, q, hidden] -> [1, q, len(exit_vocab) or vocab]."""
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        hidden = self.model.model.norm(hidden)
        if self._exit_head is None:
            return self.model.lm_head(hidden)
        return hidden @ self._exit_head.T

    def shallow_step(self, token: int) -> tuple[float, int]:
        """Run one token through the shallow layers and stack it; return the exit head's
        (confidence, token): its top softmax probability over the exit vocabulary and the
        token id there."""
        import torch

        hidden = self.shallow(torch.tensor([[token]], dtype=torch.long))
        self.stack_ids.append(token)
        self._stack_hidden.append(hidden)
        self.shallow_passes += 1
        confidence, index = self.exit_logits(hidden)[0, -1].float().softmax(dim=-1).max(dim=-1)
        index = int(index)
        return confidence.item(), int(self.exit_vocab[index]) if self.exit_vocab is not None else index

    def __call__(self, input_ids, past_key_values, use_cache: bool = True, logits_to_keep: int = 0, **kwargs):
        """The deep model over ``input_ids``, reusing the stack (see the class docstring)."""
        import torch

        if past_key_values is not self.cache:
            if self.stack_ids:
                raise RuntimeError("FREE: a new cache while tokens are stacked on another one")
            self.cache = past_key_values
        stacked = len(self.stack_ids)
        ids = input_ids[0].tolist()
        if ids[:stacked] != self.stack_ids:
            raise RuntimeError(f"FREE: the verify's tokens {ids[:stacked]} are not the stacked ones {self.stack_ids}")
        parts = list(self._stack_hidden)
        if len(ids) > stacked:  # tokens not yet through the shallow layers (prefill; a draft's last)
            parts.append(self.shallow(input_ids[:, stacked:]))
        self.stack_ids, self._stack_hidden = [], []
        hidden = self._run_layers(torch.cat(parts, dim=1), self.exit_layer, len(self.model.model.layers))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        hidden = self.model.model.norm(hidden)
        # the LM head 3 positions at a time: on CPU a float32 matmul of the head with 4+ rows
        # takes a kernel several times slower than with 1 to 3 (3 rows cost about what 1
        # does); each row's logits are computed the same way either way
        logits = [self.model.lm_head(part) for part in hidden.split(HEAD_ROWS, dim=1)]
        return SimpleNamespace(logits=torch.cat(logits, dim=1))


# ---- drafter and acceptance ------------------------------------------------------------------


class ShallowExitDrafter(Drafter):
    """Drafts the tokens that exit: runs the shallow model token by token while its
    confidence reaches the threshold.

    Example: threshold 0.8; after ``last`` the exit head gives (" the", 0.95), then
    (" cat", 0.88), then (" sat", 0.41): the draft is [" the", " cat"]; ``last``, " the"
    and " cat" are stacked, and " sat" is left to the deep pass. The pairs (0.95, ...),
    (0.88, ...), (0.41, ...) wait for the deep pass to say whether each agreed.
    """

    def __init__(self, shallow_deep: ShallowDeep, threshold: ExitThreshold, eos_token_ids, max_stack: int):
        self.shallow_deep = shallow_deep
        self.target = shallow_deep  # the contract's: the verify runs the deep layers over the stack
        self.threshold = threshold
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_stack = max_stack
        self.exit_confidences: list[float] = []  # per stacked position whose exit head ran
        self.exit_predictions: list[int] = []

    @property
    def forward_passes(self) -> int:  # the contract's: the shallow passes
        return self.shallow_deep.shallow_passes

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        draft: list[int] = []
        token = tokens[-1]
        # the draft's last token is left to the verify (batched with the stack) when the
        # budget or the stack is full or it is EOS: no exit head is needed after it
        while len(draft) < min(max_tokens, self.max_stack - 1):
            confidence, prediction = self.shallow_deep.shallow_step(token)
            self.exit_confidences.append(confidence)
            self.exit_predictions.append(prediction)
            if confidence < self.threshold.value:
                break
            draft.append(prediction)
            token = prediction
            if prediction in self.eos_token_ids:
                break
        return draft



class FreeAcceptance:
    """After a deep pass: feed the agreement pairs to the threshold, then keep the whole
    draft and the deep model's next token (lossy, the paper's), or only the draft prefix
    that equals the deep argmax plus the deep model's own token (lossless, ``ExactMatch``).

    Example: draft [5, 9, 4], deep argmax over [last, 5, 9, 4] is [5, 9, 7, 2]: lossy keeps
    [5, 9, 4, 2]; lossless keeps [5, 9, 7].
    """

    def __init__(self, drafter: ShallowExitDrafter, lossless: bool):
        self.drafter = drafter
        self.lossless = lossless
        self.exact = ExactMatch()

    def accept(self, draft: Sequence[int], logits) -> list[int]:
        predicted = logits.argmax(dim=-1).tolist()  # [k + 1]
        drafter = self.drafter
        for confidence, shallow, deep in zip(drafter.exit_confidences, drafter.exit_predictions, predicted):
            drafter.threshold.observe(confidence, shallow == deep)
        drafter.exit_confidences, drafter.exit_predictions = [], []
        if self.lossless:
            return self.exact.accept(draft, logits)
        return [*draft, predicted[len(draft)]]


# ---- the methods ---------------------------------------------------------------------------


class FreeState:
    """What FREE keeps across the requests of one generator: the adapter of each exit
    layer (loaded once) and the fitted threshold of each setting (mode, exit layer,
    adapter, start value, agree_posterior)."""

    def __init__(self):
        self.adapters: dict[tuple[int, str | None], object] = {}
        self.thresholds: dict[tuple, ExitThreshold] = {}  # adaptive ones, by build_free's setting key


def exit_vocabulary(prompt_ids: Sequence[int], size: int, model):
    """The exit head's vocabulary: the first ``size`` token ids plus the prompt's tokens;
    None (the whole vocabulary) when ``size`` is 0 or covers it.

    BPE tokenizers number tokens in merge order, so low ids are the common ones: Qwen2.5's
    first 16,384 of 151,665 hold most running text; the prompt's own tokens add the names
    and rare words an answer copies. Scoring 16k rows instead of 152k cuts the exit head
    of qwen2.5-coder-0.5b from 136M multiply-adds to 15M. A token outside the set never
    exits (the deep pass decodes it), so the lossless mode stays lossless.
    """
    import torch

    vocab = model.lm_head.weight.shape[0]
    if not size or size >= vocab:
        return None
    extra = torch.tensor(sorted({t for t in prompt_ids if size <= t < vocab}), dtype=torch.long)
    return torch.cat([torch.arange(size), extra])


def build_free(generator, prompt_ids: Sequence[int], config: FreeConfig, lossless: bool) -> tuple[ShallowExitDrafter, FreeAcceptance]:
    model = generator.model
    depth = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else 0
    exit_layer = config.exit_layer
    if exit_layer is None:  # a model trained for FREE exits where it was trained to
        exit_layer = trained_exit_layer(generator.name) or default_exit_layer(depth)
    state = generator.method_state.setdefault("free", FreeState())
    key = (exit_layer, config.adapter)
    if key not in state.adapters:
        path = Path(config.adapter).expanduser() if config.adapter else adapter_path(generator.name, exit_layer)
        if config.adapter and not path.exists():
            raise FileNotFoundError(f"FREE adapter {path} not found: run `ragdec free calibrate` or fix the path")
        dtype = next(model.parameters()).dtype
        state.adapters[key] = load_adapter(path, model.config.hidden_size, dtype).eval() if path.exists() else None
    # one fitted threshold per setting, kept across requests so that it follows the
    # workload; settings that differ (a sweep in one bench run) do not reset each other.
    # A fixed threshold has nothing to keep.
    if config.adaptive:
        setting = ("free-lossless" if lossless else "free", exit_layer, config.adapter, config.exit_threshold, config.agree_posterior)
        if setting not in state.thresholds:
            state.thresholds[setting] = ExitThreshold(config.exit_threshold, True, config.agree_posterior)
        threshold = state.thresholds[setting]
    else:
        threshold = ExitThreshold(config.exit_threshold, adaptive=False)
    shallow_deep = ShallowDeep(model, exit_layer, state.adapters[key], exit_vocabulary(prompt_ids, config.exit_vocab, model))
    drafter = ShallowExitDrafter(shallow_deep, threshold, generator.eos_token_ids, config.max_stack)
    return drafter, FreeAcceptance(drafter, lossless)


@register_method("free")
def _free(generator, prompt_ids, references, params):
    return build_free(generator, prompt_ids, free_config(params.options), lossless=False)


@register_method("free-lossless", lossless=True)
def _free_lossless(generator, prompt_ids, references, params):
    return build_free(generator, prompt_ids, free_config(params.options, lossless=True), lossless=True)
