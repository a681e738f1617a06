"""What a verify forward costs on this machine, and the draft length that pays.

On a GPU a forward over 8 tokens costs about as much as over 1; on a CPU it does not
(Qwen 0.5B on 2 cores: about 2x), so a draft must be long only where it is likely to
be accepted. The cost curve is measured once per model and machine and kept in
``$RAGDEC_HOME/costs/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ragdec.files import write_json

MEASURED_DRAFTS = (0, 1, 2, 4, 8, 12, 16)  # draft lengths timed; the rest interpolated


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


def _interpolate(points: dict[int, float], upto: int) -> tuple[float, ...]:
    known = sorted(points)
    out = []
    for k in range(upto + 1):
        lo = max(x for x in known if x <= k)
        hi = min((x for x in known if x >= k), default=lo)
        out.append(points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo))
    return tuple(out)


def measure_forward_cost(model, context_len: int = 512, repeats: int = 5) -> ForwardCost:
    """Time forwards of 1 + k tokens on a cache of ``context_len`` positions.

    Each length keeps its fastest run: other work on the machine only ever adds time, so
    the minimum is the estimate least disturbed by it. Costs are then made
    non-decreasing in k, as a longer forward never costs less.
    """
    import torch

    from .kv import crop_to, new_cache

    vocab = model.config.vocab_size
    limit = getattr(model.config, "max_position_embeddings", None) or context_len * 2
    context_len = max(1, min(context_len, limit - MEASURED_DRAFTS[-1] - 2))
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (1, context_len), generator=generator)
    points: dict[int, float] = {}
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for k in (0, *MEASURED_DRAFTS):  # the first k=0 run is a warm-up
            block = torch.randint(0, vocab, (1, k + 1), generator=generator)
            timings = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=block, past_key_values=cache, use_cache=True, logits_to_keep=k + 1)
                timings.append(time.perf_counter() - start)
                crop_to(cache, context_len)
            points[k] = min(timings)
    seconds = _interpolate(points, MEASURED_DRAFTS[-1])
    return ForwardCost(tuple(max(seconds[: k + 1]) for k in range(len(seconds))))


_MEMO: dict[str, ForwardCost] = {}


def forward_cost(model, model_name: str) -> ForwardCost:
    """The model's cost curve: from memory, from the on-disk record, or measured now
    (a few seconds, once per model, machine and thread count)."""
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
        cost = ForwardCost(tuple(json.loads(path.read_text())["seconds"]))
    except (OSError, ValueError, KeyError):
        cost = measure_forward_cost(model)
        write_json({"model": model_name, "seconds": cost.seconds}, path)
    _MEMO[key] = cost
    return cost


def _cpu_id() -> str:
    from .generator import cpu_name

    return "".join(c if c.isalnum() else "-" for c in cpu_name())[:40]
