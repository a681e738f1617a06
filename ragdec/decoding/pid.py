"""PiD for decoder-only models: many questions about one document, answered in one batch.

When several questions are asked about one document, their chat-templated prompts share
a long prefix (system prompt, document) and differ only in a short suffix (the question).
PiD reads the prefix once and decodes every answer in one batch on top of it:

1. prefill the shared prefix once, at batch size 1;
2. prefill every question's suffix as one left-padded batch on top of that prefix KV
   (shared by every row as a view, see ``batch_kv.SharedPrefixLayer``; positions continue from the
   prefix per row, padding is masked);
3. decode all rows in parallel: each step drafts per row (nothing for plain greedy, a copy
   from the document for LLMA), verifies every row's ``[last, *draft]`` in one batched
   forward, accepts per row by exact match and stops per row (EOS, stop strings, budget);
   rows that finish leave the batch.

Each row's answer is what greedy decoding of that prompt alone gives. The batched forward
computes the same function as the lone one, but not with the same float roundings (a
matmul over 8 rows may sum in another order than over 1; padding changes the attention
kernel's blocks), so a row can differ only where two tokens' logits tie to within float
noise. ``identical_to_sequential_greedy`` in ``ragdec bench pid`` measures how often.

Layout of the cache, for rows A (suffix a1 a2 a3) and B (suffix b1), prefix p1 p2:

    columns      p1 p2 | pad a1 a2 a3 | a4 a5 ...
    row A valid   1  1 |  1  1  1  1  |  ...
    row B valid   1  1 |  0  0  0  1  |  ...      (b1 sits in the last suffix column)

With LLMA a row that accepts fewer draft tokens than another leaves masked columns
behind (``valid`` 0); columns that no row uses any more are dropped from time to time.

The batch is the one decode loop's (``loop.BatchDecoder.start_shared``): PiD only picks
the shared prefix and builds one row per question.

One request alone has nothing to share: the methods ``pid`` and ``pid-llma`` registered
here answer it as ``greedy`` and ``llma`` do; ``pid_generate`` / ``pid_stream`` take the
batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .generator import TextChunk
from .loop import BatchDecoder, Row, check_context
from .methods import GenerationParams, method_factory, register_method
from .stopping import StopCondition
from .text import TextStream

# batch method -> the per-row method whose drafter and acceptance rule each row uses
PID_METHODS = {"pid": "greedy", "pid-llma": "llma"}


@register_method("pid", lossless=True)
def _pid_alone(generator, prompt_ids, references, params):
    """One request: nothing to share, so greedy (the batch goes through ``pid_generate``)."""
    return method_factory("greedy")(generator, prompt_ids, references, params)


@register_method("pid-llma", lossless=True)
def _pid_llma_alone(generator, prompt_ids, references, params):
    """One request: nothing to share, so llma (the batch goes through ``pid_generate``)."""
    return method_factory("llma")(generator, prompt_ids, references, params)


def shared_prefix_len(prompts_ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the prompts, leaving every prompt at least
    one token of its own (the last prompt token's logits give the first answer token).

    Example: [[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7]] -> 2 ([1, 2]); a single prompt
    [1, 2, 3] -> 2 (its last token is its suffix).
    """
    if not prompts_ids:
        return 0
    first = prompts_ids[0]
    limit = min(len(p) for p in prompts_ids) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts_ids):
        n += 1
    return max(n, 0)


def pid_stream(
    generator,
    prompts_ids: Sequence[Sequence[int]],
    params: GenerationParams = GenerationParams(method="pid"),
    references: Sequence[str] = (),
    share: str = "view",
) -> Iterator[tuple[int, TextChunk]]:
    """Answer every prompt in one batch; yield ``(row index, TextChunk)`` as text comes.

    Args:
        generator: a ``Generator`` (model, tokenizer, EOS ids).
        prompts_ids: the questions' full prompts, chat template applied; they should share
            a long prefix (system prompt, document) for PiD to pay.
        params: ``method`` is ``pid`` (greedy rows) or ``pid-llma`` (each row copies from
            ``references`` and the prompt with its own LLMA drafter); ``greedy`` and ``llma``
            are taken as the same; ``max_new_tokens`` and ``stop`` apply to every row;
            ``options`` go to the row method (llma's knobs).
        references: text every row may copy from (the document).
        share: ``view`` (one copy of the prefix KV for the batch) or ``copy`` (one per row).

    Yields:
        ``(i, chunk)``: new text of prompt ``i``; its last chunk carries ``finish_reason``
        and the row's ``DecodeStats``. Chunks of different rows interleave.
    """
    row_method = PID_METHODS.get(params.method, params.method)
    if row_method not in PID_METHODS.values():
        raise ValueError(f"pid decodes rows by {', '.join(PID_METHODS)}, not {params.method!r}")
    if not prompts_ids:
        return
    for prompt in prompts_ids:
        check_context(generator.model, len(prompt), params.max_new_tokens)

    factory = method_factory(row_method)
    stop = StopCondition(generator.eos_token_ids, tuple(params.stop), params.max_new_tokens)
    detokenize = generator.decode_text
    prefix_len = shared_prefix_len(prompts_ids)
    rows, texts = [], []
    for i, prompt in enumerate(prompts_ids):
        drafter, acceptance = factory(generator, prompt, references, params)
        rows.append(Row(key=i, tokens=list(prompt), prompt_len=len(prompt), drafter=drafter, acceptance=acceptance,
                        stop=stop, detokenize=detokenize))
        texts.append(TextStream(detokenize, params.stop))

    decoder = BatchDecoder(generator.model, lock=generator.model_lock)
    # 1.-2. the shared prefix once, every row's own suffix in one batched forward; then
    # 3.-5. steps of the batch until every row has stopped
    events = decoder.start_shared(rows, prefix_len, share)
    while True:
        for row, block in events:
            final = block.finish_reason is not None
            text = texts[row.key].push(block.token_ids, final)
            yield row.key, TextChunk(text, block.token_ids, block.finish_reason, block.stats)
        if not decoder.busy:
            return
        events = decoder.step()


def pid_generate(
    generator,
    prompts_ids: Sequence[Sequence[int]],
    params: GenerationParams = GenerationParams(method="pid"),
    references: Sequence[str] = (),
    share: str = "view",
) -> list[TextChunk]:
    """Answer every prompt in one batch (see ``pid_stream``); one whole answer per prompt
    (``TextChunk.join``), in order."""
    chunks: list[list[TextChunk]] = [[] for _ in prompts_ids]
    for i, chunk in pid_stream(generator, prompts_ids, params, references, share):
        chunks[i].append(chunk)
    return [TextChunk.join(row) for row in chunks]


# ---- the batched forwards ----------------------------------------------------------------
