"""The one decode loop, over a batch of rows: prefill, then propose, verify, accept, crop.

Each row is one request with its own prompt, drafter, acceptance rule, stop condition and
stats. A step of ``BatchDecoder``:

1. prefill: a row that is joining reads the next chunk of its prompt at batch 1 (the whole
   prompt when no row is decoding: nobody waits); once read, its first token comes from
   the prompt's last logits and it joins the batch;
2. propose: every decoding row drafts (greedy rows propose nothing, llma rows copy from
   their own references), cut to the width the batch cost model says pays;
3. verify: one forward over every row's ``[last token, *draft]``;
4. accept: each row keeps a prefix of its draft and one token of the target's own;
5. crop: each row's KV keeps what it accepted (``RowsKV.keep``); finished rows leave.

A batch of one is the plain case: ``decode`` runs one row to its end, and its forwards
are exactly those of a lone decode (plain greedy: one token a step, what
``model.generate(do_sample=False)`` does, minus its per-step bookkeeping). Rows join
between steps, so a server can feed requests into a running batch (``scheduler.py``), and
PiD is rows that start together on a shared prefix (``start_shared``).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .batch_kv import RowsKV, TransformersRows, prefill_row
from .kv import PrefixStore, new_cache
from .seam import AcceptanceRule, Block, DecodeStats, Drafter
from .stopping import StopCondition


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a request that cannot fit: an empty prompt, no budget, or past the context."""
    if prompt_len < 1:
        raise ValueError("the prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {limit} tokens: shorten the prompt or lower max_new_tokens"
        )


@dataclass(eq=False, kw_only=True)
class Row:
    """One request's decoding state; built with keywords, e.g.
    ``Row(tokens=list(prompt), prompt_len=len(prompt), drafter=NoDraft(), acceptance=ExactMatch(),
    stop=stop, detokenize=tokenizer.decode)``."""

    key: object = 0  # the caller's handle for this row (an index, a request)
    tokens: list[int]  # prompt, then the answer so far; the last token is not in the KV yet
    prompt_len: int
    drafter: Drafter
    acceptance: AcceptanceRule
    stop: StopCondition
    detokenize: Callable[[Sequence[int]], str]  # token ids -> text, for stop strings
    prefixes: PrefixStore | None = None  # kept prompt prefixes to reuse and to keep
    prefix_len: int = 0  # how much of the prompt is such a prefix
    started: float = field(default_factory=time.perf_counter)
    cache: object = None  # the row's own KV while its prompt is read (batch 1)
    filled: int = 0  # prompt tokens in ``cache``
    reused: int = 0  # prompt tokens whose KV came from a kept prefix or a shared one
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    cancelled: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def alone(self) -> bool:
        """A row whose drafter brings its own target (``Drafter.target``) decodes alone:
        that target works on this row's cache, so its forwards take no other rows."""
        return self.drafter.target is not None

    def stats(self) -> DecodeStats:
        return DecodeStats(
            forward_passes=self.forward_passes,
            new_tokens=len(self.generated),
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            seconds=time.perf_counter() - self.started,
            prefill_seconds=self.prefill_seconds,
            prompt_tokens=self.prompt_len,
            reused_prompt_tokens=self.reused,
            drafter_forward_passes=self.drafter.forward_passes,
        )


class BatchDraftWidth:
    """How many draft tokens the batch verifies in a step; longer drafts are cut to it.

    Each row's drafter picks its draft length for a lone request, but in a batch every
    row pays for the widest draft: a forward over B rows of 1 + W tokens costs about what
    one over B * (1 + W) tokens does (``ForwardCost`` measured at batch 1, extrapolated
    linearly past its longest draft). The width kept is the one with the most expected
    tokens per second, with each draft token standing with the batch's pooled acceptance
    rate p (accepted tokens against drafts cut short, prior 3:1) until the first miss.
    A batch of one keeps its drafter's own choice.

    Example: 4 rows drafting [0, 0, 0, 6], p = 0.75, seconds(4 tokens) = 0.20,
    seconds(28 tokens) = 0.60: W = 0 gives 4 tokens in 0.20 s (20/s); W = 6 gives
    4 + (0.75 + ... + 0.75^6) = 6.46 tokens in 0.60 s (10.8/s), so the draft is not sent.
    """

    PRIOR_ACCEPTED, PRIOR_REJECTED = 3.0, 1.0

    def __init__(self, cost=None):
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
        if self.cost is None or widest == 0 or len(draft_lens) == 1:
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


class BatchDecoder:
    """Decodes a changing batch of rows, one step at a time (see the module's docstring).

    Args:
        model: the target causal LM.
        prefill_chunk: prompt tokens a joining row reads per step while other rows are
            decoding (None: the whole prompt at once). Smaller chunks stall the running
            rows less; larger ones read prompts faster.
        max_rows: rows decoding at once; joining rows wait past it.
        lock: held around each step, when other loops run forwards on the same model.
        rows_kv: makes the KV seam over the rows for a target model (``RowsKV``); the
            batch's own model, or a lone row's drafter's target.
    """

    def __init__(self, model, prefill_chunk: int | None = None, max_rows: int | None = None, lock=None,
                 rows_kv: Callable[[object], RowsKV] = TransformersRows):
        self.model = model
        self.lock = lock or nullcontext()  # held around each step
        self.prefill_chunk = prefill_chunk
        self.max_rows = max_rows
        self.rows_kv = rows_kv
        self.kv = rows_kv(model)
        self.kv_target = model  # the model ``kv`` runs: the batch's, or its lone row's own target
        self.rows: list[Row] = []  # decoding, in the order of the KV's rows
        self.joining: deque[Row] = deque()  # reading their prompts, first come first
        self.width = BatchDraftWidth()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.joining)

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def add(self, row: Row) -> None:
        """Queue a row; it joins the batch between steps once its prompt is read."""
        check_context(self._target(row), row.prompt_len, row.stop.max_new_tokens)
        if self.width.cost is None:
            self.width.cost = row.drafter.cost
        self.joining.append(row)

    def cancel(self, key) -> None:
        """The row of ``key`` leaves before the next step."""
        for row in (*self.rows, *self.joining):
            if row.key == key:
                row.cancelled = True

    def start_shared(self, rows: Sequence[Row], prefix_len: int, share: str = "view") -> list[tuple[Row, Block]]:
        """Start an empty batch with ``rows`` whose prompts share their first ``prefix_len``
        tokens (PiD): the prefix is read once, the rest of every prompt in one batched
        forward; returns each row's first block."""
        import torch

        if self.busy:
            raise ValueError("rows sharing a prefix start an empty batch")
        for row in rows:
            check_context(self.model, row.prompt_len, row.stop.max_new_tokens)
            if self.width.cost is None:
                self.width.cost = row.drafter.cost
        self._use_target(self.model)
        with self.lock, torch.inference_mode():
            logits = self.kv.start_shared(rows[0].tokens[:prefix_len], [r.tokens[prefix_len:] for r in rows], share)
        events = []
        finished = []
        for r, row in enumerate(rows):
            row.reused = prefix_len if r > 0 else 0
            self.rows.append(row)
            if self._first_token(row, logits[r : r + 1], events):
                finished.append(r)
        self._leave(finished)
        return events

    def step(self) -> list[tuple[Row, Block]]:
        """One step: a prefill chunk of a joining row, then one forward of the decoding
        rows. Returns the blocks it produced, in no particular order across rows."""
        import torch

        events: list[tuple[Row, Block]] = []
        self._leave([r for r, row in enumerate(self.rows) if row.cancelled])
        while self.joining and self.joining[0].cancelled:
            self.joining.popleft()
        with self.lock, torch.inference_mode():
            if self.joining and self._may_join(self.joining[0]):
                self._prefill(self.joining[0], events)
            if self.rows:
                self._decode(events)
        return events

    # ---- 1. prefill --------------------------------------------------------------------

    def _may_join(self, row: Row) -> bool:
        if not self.rows:
            return True
        if row.alone or self.rows[0].alone or self.kv.prefix_len:
            return False
        return self.max_rows is None or len(self.rows) < self.max_rows

    def _prefill(self, row: Row, events: list) -> None:
        """Read the next part of ``row``'s prompt; when it is all read, the row's first
        token, and the row joins the batch (or ends, if that token already stops it)."""
        model = self._target(row)
        keep_at = min(row.prefix_len, row.prompt_len - 1) if row.prefixes is not None else 0
        if row.cache is None:
            if keep_at > 0:
                row.cache, row.reused = row.prefixes.longest(row.tokens[:keep_at])
                row.filled = row.reused
            if row.cache is None:
                row.cache = new_cache(model)
        # a kept prefix is read on its own, so every request sharing it reads it alike
        end = keep_at if row.filled < keep_at else row.prompt_len
        if self.rows and self.prefill_chunk:
            end = min(end, row.filled + self.prefill_chunk)
        logits = prefill_row(model, row.tokens[row.filled : end], row.cache)
        row.filled = end
        if end == keep_at and row.reused < keep_at:
            row.prefixes.keep(row.tokens[:keep_at], row.cache)
        if row.filled < row.prompt_len:
            return
        self.joining.popleft()
        row.forward_passes += 1  # the prompt, counted as one forward however it was read
        cache, row.cache = row.cache, None
        if not self._first_token(row, logits, events):
            if not self.rows:
                self._use_target(model)
            self.kv.join(cache, row.prompt_len)
            self.rows.append(row)

    def _first_token(self, row: Row, logits, events: list) -> bool:
        """The acceptance rule picks the first token from the prompt's last logits, as from
        a verify over an empty draft; True when that token already ends the row."""
        first = row.acceptance.accept([], logits)[0]
        row.prefill_seconds = time.perf_counter() - row.started
        row.tokens.append(first)
        finish = row.stop.first_stop(row.generated, 0, row.detokenize)
        events.append((row, Block((first,), finish[1], row.stats()) if finish else Block((first,))))
        return finish is not None

    # ---- 2.-5. a decode step -----------------------------------------------------------

    def _decode(self, events: list) -> None:
        # 2. propose: the bonus token always comes on top of the draft, so a draft may
        #    use all but one of the tokens left in the budget
        drafts = []
        for row in self.rows:
            room = row.stop.max_new_tokens - len(row.generated) - 1
            drafts.append(row.drafter.propose(row.tokens, room) if room > 0 else [])
        width = self.width.width([len(d) for d in drafts])
        drafts = [d[:width] for d in drafts]
        # 3. verify: each row's KV holds every token but its last; one forward covers
        #    every row's last token and draft
        logits = self.kv.forward([[row.tokens[-1], *d] for row, d in zip(self.rows, drafts)], [len(row.tokens) - 1 for row in self.rows])
        # 4. accept: a prefix of the draft, then one token of the target's own
        accepted = []
        for r, (row, draft) in enumerate(zip(self.rows, drafts)):
            accepted.append(row.acceptance.accept(draft, logits[r, : len(draft) + 1]))
        # 5. crop: a row keeps the KV of its last token and its accepted draft prefix; the
        #    target's own token is not in the KV yet
        self.kv.keep([len(a) for a in accepted])
        finished = []
        for r, (row, draft, kept) in enumerate(zip(self.rows, drafts, accepted)):
            accepted_len = len(kept) - 1
            row.forward_passes += 1
            row.drafted += len(draft)
            row.accepted += accepted_len
            if draft:
                self.width.observe(len(draft), accepted_len)
            step_start = len(row.generated)
            row.tokens.extend(kept)
            row.drafter.observe(row.tokens, len(draft), accepted_len)
            finish = row.stop.first_stop(row.generated, step_start, row.detokenize)
            if finish:
                keep, reason = finish
                del row.tokens[row.prompt_len + keep :]
                events.append((row, Block(tuple(row.generated[step_start:]), reason, row.stats())))
                finished.append(r)
            else:
                events.append((row, Block(tuple(kept))))
        self._leave(finished)

    def _leave(self, finished: Sequence[int]) -> None:
        if finished:
            self.kv.drop(finished)
            gone = set(finished)
            self.rows = [row for r, row in enumerate(self.rows) if r not in gone]

    def _target(self, row: Row):
        """The model that runs ``row``'s forwards: its drafter's own target, or the batch's."""
        return row.drafter.target if row.drafter.target is not None else self.model

    def _use_target(self, target) -> None:
        """Before a row joins an empty batch: the rows' KV runs ``target`` (a new one when
        the last batch ran another)."""
        if target is not self.kv_target:
            self.kv = self.rows_kv(target)
            self.kv_target = target


def decode(model, row: Row, lock=None) -> Iterator[Block]:
    """Decode one request (a batch of one), yielding the accepted tokens of each step.

    Args:
        model: a causal LM whose forward takes ``past_key_values`` and ``logits_to_keep``
            (``row.drafter.target`` runs instead when the drafter brings its own).
        row: the request: its prompt (``tokens``, chat template applied, and
            ``prompt_len``), drafter (``greedy.NoDraft`` for plain greedy), acceptance
            rule, stop condition and ``detokenize``; with ``prefixes`` and ``prefix_len``
            the KV of ``tokens[:prefix_len]`` (a fixed system prompt, a conversation's
            history) is reused from ``prefixes`` when kept there, and kept there when not.
            The prompt is then prefilled in two parts, which every request sharing that
            prefix does alike.
        lock: held around each step (a lock shared by every loop on the model).

    Yields:
        Blocks of new token ids; the last one carries ``finish_reason`` and ``stats``.
    """
    decoder = BatchDecoder(model, lock=lock)
    decoder.add(row)
    while decoder.busy:
        for _, block in decoder.step():
            yield block
