"""What a verify forward costs on this machine, and the draft length that pays.

On a GPU a forward over 8 tokens costs about as much as over 1; on a CPU it does not,
so a draft must be long only where it is likely to be accepted. The cost curve is
measured once per model and machine and kept in ``$RAGDEC_HOME/costs/``.

Every draft length is timed: the curve is no straight line. torch's int4 kernel works
through a forward's positions four at a time, so in int4 a forward's cost is a
staircase, flat within each block of four positions and rising between blocks (the
per-width timings of bench/results/llamacpp_verify.json). Interpolating between a few
timed lengths mispriced the steps and steered drafts away from the lengths that pay most.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ragdec.files import write_json

MAX_DRAFT = 16  # longest draft timed; every length up to it is timed
CURVE_VERSION = 2  # records of an older version (interpolated between a few lengths) are measured again


@dataclass(frozen=True)
class ForwardCost:
    seconds: tuple[float, ...]  # seconds[k]: one forward over the last token + k draft tokens

    @property
    def max_draft(self) -> int:
        return len(self.seconds) - 1

    def best_draft_len(self, survival: "float | Sequence[float]", available: int) -> int:
        """The draft length with the most expected tokens per second.

        ``survival[j - 1]`` is the chance that at least j draft tokens stand; a single
        number ``a`` means each token stands with probability a until the first miss
        (survival a^j). A draft of k yields 1 + survival[0] + ... + survival[k - 1]
        tokens (the 1 is the target's own token) in ``seconds[k]``; k = 0 is plain greedy.

        Example: seconds = (0.12, 0.14, 0.15, 0.17, 0.25), a = 0.5: k=0 gives 1/0.12 = 8.3
        tokens/s, k=1 1.5/0.14 = 10.7, k=2 1.75/0.15 = 11.7, k=3 1.875/0.17 = 11.0, so 2.
        With a = 0.1 every draft costs more than it brings: 0.
        """
        best_k, best_rate = 0, 1.0 / self.seconds[0]
        expected = 1.0
        for k in range(1, min(available, self.max_draft) + 1):
            expected += survival**k if isinstance(survival, float) else survival[k - 1]
            rate = expected / self.seconds[k]
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


def measure_forward_cost(model, context_len: int = 512, repeats: int = 5, progress: bool = False) -> ForwardCost:
    """Time forwards of 1 + k tokens on a cache of ``context_len`` positions, for every
    k from 0 to ``MAX_DRAFT``.

    Each length keeps its fastest run: other work on the machine only ever adds time, so
    the minimum is the estimate least disturbed by it; the lengths take turns, so that a
    burst of other work cannot spoil every run of one length. Costs are then made
    non-decreasing in k, as a longer forward never costs less.
    """
    import torch
    from tqdm import tqdm

    from .kv import crop_to, new_cache

    vocab = model.config.vocab_size
    limit = getattr(model.config, "max_position_embeddings", None) or context_len * 2
    context_len = max(1, min(context_len, limit - MAX_DRAFT - 2))
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (1, context_len), generator=generator)
    best = [float("inf")] * (MAX_DRAFT + 1)
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
        blocks = [torch.randint(0, vocab, (1, k + 1), generator=generator) for k in range(MAX_DRAFT + 1)]
        bar = tqdm(total=(repeats + 1) * len(blocks), desc="timing draft lengths", unit="forward", disable=not progress)
        for round_ in range(repeats + 1):  # round 0 is a warm-up
            for k, block in enumerate(blocks):
                bar.update()  # lengths interleaved: a burst of other work hits few of one length's runs
                start = time.perf_counter()
                model(input_ids=block, past_key_values=cache, use_cache=True, logits_to_keep=k + 1)
                if round_:
                    best[k] = min(best[k], time.perf_counter() - start)
                crop_to(cache, context_len)
        bar.close()
    return ForwardCost(tuple(max(best[: k + 1]) for k in range(len(best))))


_MEMO: dict[str, ForwardCost] = {}


def forward_cost(model, model_name: str, progress: bool = False) -> ForwardCost:
    """The model's cost curve: from memory, from the on-disk record, or measured now
    (once per model, weight configuration, machine and thread count). `ragdec models
    prepare` measures it, so that a first request does not wait for it."""
    import torch

    from ragdec.models.home import ragdec_home

    from .int4 import weights_name

    # float32 keeps the key it always had; other weights cost otherwise and get their own
    weights = weights_name(model)
    suffix = "" if weights == "float32" else f"-{weights}"
    key = f"{Path(model_name).name or 'model'}{suffix}-{_cpu_id()}-t{torch.get_num_threads()}"
    if key in _MEMO:
        return _MEMO[key]
    path = ragdec_home() / "costs" / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        if record.get("version") != CURVE_VERSION:
            raise ValueError(f"{path} holds an older curve")
        cost = ForwardCost(tuple(record["seconds"]))
    except (OSError, ValueError, KeyError, AttributeError):
        cost = measure_forward_cost(model, progress=progress)
        write_json({"model": model_name, "version": CURVE_VERSION, "seconds": cost.seconds}, path)
    _MEMO[key] = cost
    return cost


def _cpu_id() -> str:
    from .generator import cpu_name

    return "".join(c if c.isalnum() else "-" for c in cpu_name())[:40]
