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

One request alone has nothing to share: the methods ``pid`` and ``pid-llma`` registered
here answer it as ``greedy`` and ``llma`` do; ``pid_generate`` / ``pid_stream`` take the
batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .batch_kv import packed_gqa, share_prefix
from .generator import Generation, TextChunk
from .loop import prefill
from .methods import GenerationParams, method_factory, register_method
from .seam import AcceptanceRule, DecodeStats, Drafter
from .stopping import StopCondition
from .text import TextStream

# batch method -> the per-row method whose drafter and acceptance rule each row uses
PID_METHODS = {"pid": "greedy", "pid-llma": "llma"}
COMPACT_AFTER = 16  # drop columns no row uses once this many have piled up


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


class BatchDraftWidth:
    """How many draft tokens the batch verifies in a step; longer drafts are cut to it.

    Each row's drafter picks its draft length for a lone request, but in a batch every
    row pays for the widest draft: a forward over B rows of 1 + W tokens costs about what
    one over B * (1 + W) tokens does (``ForwardCost`` measured at batch 1, extrapolated
    linearly past its longest draft). The width kept is the one with the most expected
    tokens per second, with each draft token standing with the batch's pooled acceptance
    rate p (accepted tokens against drafts cut short, prior 3:1) until the first miss.

    Example: 4 rows drafting [0, 0, 0, 6], p = 0.75, seconds(4 tokens) = 0.20,
    seconds(28 tokens) = 0.60: W = 0 gives 4 tokens in 0.20 s (20/s); W = 6 gives
    4 + (0.75 + ... + 0.75^6) = 6.46 tokens in 0.60 s (10.8/s), so the draft is not sent.
    """

    PRIOR_ACCEPTED, PRIOR_REJECTED = 3.0, 1.0

    def __init__(self, cost):
        self.cost = cost  # ForwardCost | None: None verifies every draft whole
        self.accepted = self.PRIOR_ACCEPTED
        self.rejected = self.PRIOR_REJECTED

    def seconds(self, tokens: int) -> float:
        """Estimated time of a forward over ``tokens`` new tokens."""
        curve = self.cost.seconds
        k = tokens - 1
        if k <= self.cost.max_draft:
            return curve[k]
        half = self.cost.max_draft // 2
        slope = (curve[-1] - curve[half]) / max(1, self.cost.max_draft - half)
        return curve[-1] + slope * (k - self.cost.max_draft)

    def width(self, draft_lens: Sequence[int]) -> int:
        widest = max(draft_lens)
        if self.cost is None or widest == 0:
            return widest
        p = self.accepted / (self.accepted + self.rejected)
        rows = len(draft_lens)
        best_width, best_rate = 0, rows / self.seconds(rows)
        for width in sorted(set(draft_lens) - {0}):
            expected = sum(1 + sum(p**j for j in range(1, min(width, k) + 1)) for k in draft_lens)
            rate = expected / self.seconds(rows * (1 + width))
            if rate > best_rate:
                best_width, best_rate = width, rate
        return best_width

    def observe(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.rejected += accepted < drafted


@dataclass
class _Row:
    """One question's decoding state."""

    index: int  # the question's place in the caller's list
    tokens: list[int]  # prompt, then the answer so far; the last token is not in the cache yet
    prompt_len: int
    drafter: Drafter
    acceptance: AcceptanceRule
    text: TextStream
    reused_prompt_tokens: int  # prefix tokens whose KV another row's prefill made
    forward_passes: int = 1  # the prefill
    drafted: int = 0
    accepted: int = 0
    new_block: list[int] | None = None  # tokens accepted in the current step

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


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
    import torch

    row_method = PID_METHODS.get(params.method, params.method)
    if row_method not in PID_METHODS.values():
        raise ValueError(f"pid decodes rows by {', '.join(PID_METHODS)}, not {params.method!r}")
    if not prompts_ids:
        return
    if any(len(p) == 0 for p in prompts_ids):
        raise ValueError("every prompt needs at least one token")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    model = generator.model
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts_ids)
    if limit and longest + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens: shorten the prompt or lower max_new_tokens"
        )

    factory = method_factory(row_method)
    stop = StopCondition(generator.eos_token_ids, tuple(params.stop), params.max_new_tokens)
    detokenize = generator.decode_text
    prefix_len = shared_prefix_len(prompts_ids)
    rows = []
    for i, prompt in enumerate(prompts_ids):
        drafter, acceptance = factory(generator, prompt, references, params)
        reused = prefix_len if i > 0 else 0
        rows.append(_Row(i, list(prompt), len(prompt), drafter, acceptance, TextStream(detokenize, params.stop), reused))

    # LLMA drafters with the cost model (no fixed copy_k) carry the machine's cost curve
    batch_width = BatchDraftWidth(getattr(rows[0].drafter, "cost", None))
    start = time.perf_counter()
    with torch.inference_mode():
        # 1. prefill the shared prefix once, at batch size 1
        from .kv import new_cache

        cache = new_cache(model)
        if prefix_len:
            prefill(model, prompts_ids[0][:prefix_len], cache)
        cache = share_prefix(cache, len(rows), share)
        row_offset = prefix_len if share == "copy" else 0  # where the rows' columns start in a layer
        # 2. prefill the suffixes as one left-padded batch: every row's last prompt token
        #    lands in the last column, whose logits give its first answer token
        logits, valid = _prefill_suffixes(model, cache, [r.tokens[prefix_len:] for r in rows], prefix_len)
        prefill_seconds = time.perf_counter() - start
        for r, row in enumerate(rows):
            row.tokens.append(row.acceptance.accept([], logits[r : r + 1])[0])

        def stats(row: _Row) -> DecodeStats:
            return DecodeStats(
                forward_passes=row.forward_passes,
                new_tokens=len(row.generated),
                drafted_tokens=row.drafted,
                accepted_tokens=row.accepted,
                seconds=time.perf_counter() - start,
                prefill_seconds=prefill_seconds,
                prompt_tokens=row.prompt_len,
                reused_prompt_tokens=row.reused_prompt_tokens,
                drafter_forward_passes=getattr(row.drafter, "forward_passes", 0),
            )

        finished = []
        for r, row in enumerate(rows):
            finish = stop.first_stop(row.generated, 0, detokenize)
            chunk_ids = tuple(row.generated)
            if finish:
                finished.append(r)
                yield row.index, TextChunk(row.text.push(chunk_ids, True), chunk_ids, finish[1], stats(row))
            else:
                yield row.index, TextChunk(row.text.push(chunk_ids), chunk_ids)
        rows, valid = _drop_rows(cache, rows, valid, finished)

        while rows:
            # 3. propose: each row drafts on its own, leaving room for the bonus token
            drafts = []
            for row in rows:
                room = stop.max_new_tokens - len(row.generated) - 1
                drafts.append(row.drafter.propose(row.tokens, room) if room > 0 else [])
            width = batch_width.width([len(d) for d in drafts])
            drafts = [d[:width] for d in drafts]
            # 4. verify every row's [last, *draft], right-padded to the longest draft
            logits = _verify_batch(model, cache, rows, drafts, prefix_len, valid)
            # 5. accept per row: its exact-match draft prefix, then the target's own token
            accepted_lens = []
            for r, (row, draft) in enumerate(zip(rows, drafts)):
                accepted = row.acceptance.accept(draft, logits[r, : len(draft) + 1])
                accepted_lens.append(len(accepted) - 1)
                row.forward_passes += 1
                row.drafted += len(draft)
                row.accepted += len(accepted) - 1
                if draft:
                    batch_width.observe(len(draft), len(accepted) - 1)
                row.new_block = accepted
            # 6. crop: a row's cache keeps its last token and accepted draft; columns past
            #    the longest acceptance go, shorter rows mask theirs
            valid = _keep_accepted(cache, valid, max(len(d) for d in drafts), accepted_lens)
            finished = []
            for r, row in enumerate(rows):
                step_start = len(row.generated)
                row.tokens.extend(row.new_block)
                row.drafter.observe(row.tokens, len(drafts[r]), accepted_lens[r])
                finish = stop.first_stop(row.generated, step_start, detokenize)
                if finish:
                    keep, reason = finish
                    del row.tokens[row.prompt_len + keep :]
                    block = tuple(row.generated[step_start:])
                    finished.append(r)
                    yield row.index, TextChunk(row.text.push(block, True), block, reason, stats(row))
                else:
                    yield row.index, TextChunk(row.text.push(row.new_block), tuple(row.new_block))
            rows, valid = _drop_rows(cache, rows, valid, finished)
            valid = _compact(cache, valid, row_offset)


def pid_generate(
    generator,
    prompts_ids: Sequence[Sequence[int]],
    params: GenerationParams = GenerationParams(method="pid"),
    references: Sequence[str] = (),
    share: str = "view",
) -> list[Generation]:
    """Answer every prompt in one batch (see ``pid_stream``); one ``Generation`` per prompt,
    in order."""
    chunks: list[list[TextChunk]] = [[] for _ in prompts_ids]
    for i, chunk in pid_stream(generator, prompts_ids, params, references, share):
        chunks[i].append(chunk)
    return [Generation.from_chunks(row) for row in chunks]


# ---- the batched forwards ----------------------------------------------------------------


def _prefill_suffixes(model, cache, suffixes: Sequence[Sequence[int]], prefix_len: int):
    """One forward over the suffixes, left-padded, on top of the prefix in ``cache``.

    Returns the logits of the last column, [B, vocab], and ``valid``, [B, S]: which of the
    rows' cache columns hold a real token.

    Example: prefix_len 5, suffixes [7, 8, 9] and [4]: input [[7, 8, 9], [pad, pad, 4]],
    positions [[5, 6, 7], [5, 5, 5]], valid [[1, 1, 1], [0, 0, 1]].
    """
    import torch

    width = max(len(s) for s in suffixes)
    pad = suffixes[0][-1]  # any id: padded columns are masked
    input_ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in suffixes])  # [B, S]
    valid = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in suffixes])  # [B, S]
    # a row's own tokens count from the prefix; its pads repeat the first position
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0) + prefix_len  # [B, S]
    mask = torch.cat([torch.ones(len(suffixes), prefix_len, dtype=torch.bool), valid], dim=-1)
    with packed_gqa(model):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1], valid


def _verify_batch(model, cache, rows: Sequence[_Row], drafts: Sequence[Sequence[int]], prefix_len: int, valid):
    """One forward over every row's ``[last, *draft]``, right-padded to the longest draft;
    return logits [B, 1 + K, vocab] (row r's first ``len(drafts[r]) + 1`` are its own).

    A row's positions continue from its own length, whatever columns it has masked.
    """
    import torch

    width = 1 + max(len(d) for d in drafts)
    input_ids = torch.tensor([[row.tokens[-1], *d] + [row.tokens[-1]] * (width - 1 - len(d)) for row, d in zip(rows, drafts)])
    first = torch.tensor([len(row.tokens) - 1 for row in rows]).unsqueeze(-1)
    position_ids = first + torch.arange(width)  # [B, 1 + K]
    # the padded draft slots come after every real one: no real token attends to them
    mask = torch.cat([torch.ones(len(rows), prefix_len, dtype=torch.bool), valid, torch.ones(len(rows), width, dtype=torch.bool)], -1)
    with packed_gqa(model):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=width,
        )
    return out.logits  # [B, 1 + K, vocab]


def _keep_accepted(cache, valid, draft_width: int, accepted_lens: Sequence[int]):
    """After a verify over 1 + ``draft_width`` columns, keep in the cache each row's last
    token and accepted draft prefix; return ``valid`` for the new columns.

    Example: drafts of 3 and 1 tokens (4 new columns); row 0 accepted 1, row 1 accepted 1:
    the last column goes from the cache (no row accepted 3), the new valid columns are
    [[1, 1, 0], [1, 1, 0]].
    """
    import torch

    kept = 1 + max(accepted_lens)
    excess = draft_width - max(accepted_lens)
    if excess > 0:
        cache.crop(-excess)
    new = torch.arange(kept).unsqueeze(0) <= torch.tensor(accepted_lens).unsqueeze(-1)  # [B, kept]
    return torch.cat([valid, new], dim=-1)


def _drop_rows(cache, rows: list[_Row], valid, finished: Sequence[int]):
    """Remove finished rows from the batch (their cache rows and mask rows)."""
    import torch

    if not finished:
        return rows, valid
    keep = [r for r in range(len(rows)) if r not in set(finished)]
    if keep:
        index = torch.tensor(keep)
        cache.batch_select_indices(index)
        valid = valid.index_select(0, index)
    return [rows[r] for r in keep], valid


def _compact(cache, valid, row_offset: int):
    """Drop the columns no remaining row uses (left padding of rows that left, rejected
    drafts) once ``COMPACT_AFTER`` of them have piled up; return the new ``valid``."""
    import torch

    used = valid.any(dim=0)
    if valid.shape[0] == 0 or int((~used).sum()) < COMPACT_AFTER:
        return valid
    columns = torch.nonzero(used).squeeze(-1)
    index = torch.cat([torch.arange(row_offset), columns + row_offset]) if row_offset else columns
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)
    return valid.index_select(1, columns)
