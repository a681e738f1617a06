"""llama.cpp as a peer in `ragdec bench`: llama-cpp-python on the zoo's own GGUF file (the
weights ragdec's float32 safetensors were dequantized from), fed the same chat-templated
token ids as every other method and timed the same way.

- ``llamacpp-greedy``: ``Llama.generate`` at temperature 0 (llama.cpp's greedy sampler).
- ``llamacpp-prompt-lookup``: the same with llama-cpp-python's own drafter,
  ``LlamaPromptLookupDecoding(num_pred_tokens, max_ngram_size)``. The drafter reads logits
  at every drafted position, so that Llama needs ``logits_all=True`` (its scores array is
  sized from that argument; without it the first draft crashes); greedy does not pay for
  that, so each method spec gets its own Llama.

Every run starts from an empty KV cache (``Llama.reset``): ``generate`` would otherwise
reuse the longest prefix shared with the previous prompt, which no other method does here.
"""

from __future__ import annotations

import time
from typing import Sequence

from .runners import Run

LLAMACPP_METHODS = ("llamacpp-greedy", "llamacpp-prompt-lookup")
# the best setting of the sweep in bench/results/llamacpp_lookup_sweep.json (rag workload)
DEFAULT_LOOKUP = {"num_pred_tokens": 2, "max_ngram_size": 3}
N_CTX = 4096  # the longest bench prompt plus its answer fits; KV for the 0.5B at 4096 is ~50 MB
INSTALL_HINT = (
    "the llama.cpp baselines need llama-cpp-python built for this CPU: run `make llamacpp` "
    "(about 10 minutes on 2 cores; a default native build dies with SIGILL on machines that "
    "report AMX without enabling it)"
)


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return llama_cpp


class LlamaCppEngines:
    """The Llama instances of one benchmark, one per method spec, loaded on first use.

    Example::

        engines = LlamaCppEngines("qwen2.5-coder-0.5b-instruct", threads=2)
        run = engines.run("llamacpp-prompt-lookup", {"num_pred_tokens": 2}, prompt_ids, 128, eos_ids)
    """

    def __init__(self, model: str, threads: int, n_ctx: int = N_CTX):
        from ragdec.models.zoo import gguf_file

        import_llama_cpp()
        self.gguf = gguf_file(model)
        self.threads = threads
        self.n_ctx = n_ctx
        self._llamas: dict[tuple, object] = {}
        # what each instance added to the process's resident memory by the end of its first
        # run (the GGUF is mapped, so its pages count once they are touched)
        self.rss_mb: dict[str, float] = {}
        self._rss_before: dict[tuple, float] = {}

    def run(self, method: str, options: dict, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: frozenset[int]) -> Run:
        from .machine import memory_mb

        settings = _settings(method, options)
        key = tuple(sorted(settings.items()))
        if key not in self._llamas:
            self._rss_before[key] = memory_mb()
            self._llamas[key] = self._load(method, settings)
        run = run_llamacpp(self._llamas[key], prompt_ids, max_new_tokens, eos_token_ids)
        if key in self._rss_before:
            self.rss_mb[_spec_name(method, settings)] = round(memory_mb() - self._rss_before.pop(key), 1)
        return run

    def _load(self, method: str, settings: dict):
        llama_cpp = import_llama_cpp()
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = None
        if method == "llamacpp-prompt-lookup":
            draft = LlamaPromptLookupDecoding(max_ngram_size=settings["max_ngram_size"], num_pred_tokens=settings["num_pred_tokens"])
        return llama_cpp.Llama(
            model_path=str(self.gguf), n_ctx=self.n_ctx, n_batch=512, n_threads=self.threads,
            n_threads_batch=self.threads, logits_all=draft is not None, draft_model=draft, verbose=False,
        )


def _settings(method: str, options: dict) -> dict:
    if method == "llamacpp-greedy":
        if options:
            raise ValueError(f"llamacpp-greedy takes no settings (got {', '.join(options)})")
        return {"method": method}
    if method != "llamacpp-prompt-lookup":
        raise ValueError(f"unknown llama.cpp method {method!r}; known: {', '.join(LLAMACPP_METHODS)}")
    unknown = set(options) - set(DEFAULT_LOOKUP)
    if unknown:
        raise ValueError(f"llamacpp-prompt-lookup settings are {', '.join(DEFAULT_LOOKUP)}; not {', '.join(sorted(unknown))}")
    return {"method": method, **DEFAULT_LOOKUP, **{k: int(v) for k, v in options.items()}}


def _spec_name(method: str, settings: dict) -> str:
    return ":".join([method] + [f"{k}={v}" for k, v in settings.items() if k != "method"])


def run_llamacpp(llama, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: frozenset[int]) -> Run:
    """Greedy generation of up to ``max_new_tokens`` after ``prompt_ids``, stopping at (and
    keeping) an end-of-sequence token, as ragdec's StopCondition does. ``forward_passes``
    counts ``Llama.eval`` calls: the prefill, then one per decode step (drafts included)."""
    llama.reset()
    forwards = 0
    plain_eval = llama.eval

    def counted_eval(tokens):
        nonlocal forwards
        forwards += 1
        return plain_eval(tokens)

    llama.eval = counted_eval  # an instance attribute: this Llama only, undone below
    tokens: list[int] = []
    first_at = None
    start = time.perf_counter()
    try:
        for token in llama.generate(list(prompt_ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if first_at is None:
                first_at = time.perf_counter()
            tokens.append(int(token))
            if token in eos_token_ids or len(tokens) >= max_new_tokens:
                break
    finally:
        del llama.eval
    end = time.perf_counter()
    return Run(tuple(tokens), (first_at or end) - start, end - start, forwards)
