"""KV cache and attention for a batch whose rows share a prompt prefix (PiD).

- ``share_prefix``: a cache holding the prefix at batch size 1 serves B rows, the prefix
  kept once per layer (``SharedPrefixLayer``) or repeated per row;
- ``packed_gqa``: sdpa over grouped-query heads without copying the keys and values per
  query head, for batched forwards over several tokens with a padding mask;
- ``RowsKV``: the seam the loop talks to (join a row, forward the rows, keep each row's
  accepted part, drop rows), and ``TransformersRows``, its implementation on these.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

SHARE_MODES = ("view", "copy")  # the prefix KV: one copy shared by all rows, or one per row


@lru_cache(maxsize=1)
def _shared_prefix_layer_class():
    """``SharedPrefixLayer``, made on first use so that importing this module stays light."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """A cache layer whose first P positions are one [1, H, P, D] tensor that every row
        of the batch shares; ``keys``/``values`` hold only the rows' own positions,
        [B, H, S, D].

        The attention kernel takes one key tensor per layer, so each forward hands it the
        prefix expanded to the batch (a stride-0 view) concatenated with the rows' part:
        a temporary the size of a per-row copy, freed after the layer's attention, where
        a DynamicCache would keep a per-row copy of the prefix in every layer for the whole
        decode (and re-concatenate all of it at every step just the same).
        """

        def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, batch_size: int):
            super().__init__()
            self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # [1, H, P, D]
            self.dtype, self.device = prefix_keys.dtype, prefix_keys.device
            heads, head_dim = prefix_keys.shape[1], prefix_keys.shape[3]
            self.keys = prefix_keys.new_empty((batch_size, heads, 0, head_dim))  # [B, H, S, D]
            self.values = prefix_values.new_empty((batch_size, heads, 0, prefix_values.shape[3]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            batch = self.keys.shape[0]
            keys = torch.cat([self.prefix_keys.expand(batch, -1, -1, -1), self.keys], dim=-2)
            values = torch.cat([self.prefix_values.expand(batch, -1, -1, -1), self.values], dim=-2)
            return keys, values

        def get_seq_length(self) -> int:
            return self.prefix_keys.shape[-2] + self.keys.shape[-2]

        def crop(self, tokens_to_remove: int) -> None:
            if -tokens_to_remove > self.keys.shape[-2]:
                raise ValueError("cannot crop into the shared prefix")
            super().crop(tokens_to_remove)

    return SharedPrefixLayer


PACKED_GQA = "ragdec_packed_gqa_sdpa"  # the attention implementation PiD's forwards use over sdpa


@lru_cache(maxsize=1)
def _register_packed_gqa() -> str:
    """Register ``PACKED_GQA`` (``packed_gqa_attention``) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_GQA, packed_gqa_attention())
    AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)
    return PACKED_GQA


@lru_cache(maxsize=1)
def packed_gqa_attention():
    """Sdpa that never repeats the key/value heads (a transformers attention function).

    With grouped-query attention (Qwen2.5 0.5B: 14 query heads, 2 key/value heads) and a
    mask, transformers' sdpa repeats every layer's keys and values per query head when more
    than one token is queried, and with many rows on a long cache that copy costs a verify
    over 2 tokens per row far more than one over 1 token. Stacking the
    queries of each key/value head instead (what transformers already does for one token)
    gives the kernel the shared keys as they are.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        batch, heads, q_len, head_dim = query.shape  # [B, H, q, D]; key, value: [B, H / groups, T, D]
        plain = groups == 1 or q_len == 1 or attention_mask is None or attention_mask.dtype != torch.bool
        if plain or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        kv_heads, kv_len = heads // groups, attention_mask.shape[-1]
        packed = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # query heads of a group, stacked
        mask = attention_mask.expand(batch, groups, q_len, kv_len).reshape(batch, 1, groups * q_len, kv_len)
        out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None  # [B, q, H, D]

    return packed_gqa_sdpa


@contextmanager
def packed_gqa(model):
    """Run the model's forwards inside with ``PACKED_GQA`` where it uses sdpa."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = _register_packed_gqa()
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def share_prefix(cache, batch_size: int, share: str = "view"):
    """Make a cache holding one prompt prefix at batch size 1 serve ``batch_size`` rows.

    ``view``: each layer keeps the prefix once (``SharedPrefixLayer``); ``copy``: each layer
    repeats it per row (what a plain DynamicCache needs). An empty cache stays as it is:
    the first forward sets its batch size.
    """
    if share not in SHARE_MODES:
        raise ValueError(f"unknown share mode {share!r}; use one of {', '.join(SHARE_MODES)}")
    if cache.get_seq_length() == 0:
        return cache
    if share == "copy":
        cache.batch_repeat_interleave(batch_size)
        return cache
    layer_class = _shared_prefix_layer_class()
    cache.layers = [layer_class(layer.keys, layer.values, batch_size) for layer in cache.layers]
    return cache


COMPACT_AFTER = 16  # drop columns no row uses once this many have piled up


class RowsKV(Protocol):
    """The seam between the loop and a model's KV state for a batch of rows.

    The loop never touches a cache: it asks for a forward over each row's new tokens and
    says how many of them each row keeps. The loop is given a factory of these
    (``BatchDecoder(rows_kv=...)``, ``TransformersRows`` by default), so a second
    implementation (llama.cpp through its batch API) fills the same methods without a
    change to the loop.
    """

    # shared prefix columns before the rows' own (PiD's ``start_shared``); while there are
    # any the batch takes no other rows
    prefix_len: int

    def __len__(self) -> int:
        """Rows in the batch."""
        ...

    def start_shared(self, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]], share: str = "view") -> "torch.Tensor":
        """Start an empty batch of rows that share ``prefix_ids``, each with its own
        suffix; the logits of each row's last prompt token, [B, vocab]."""
        ...

    def join(self, row_cache, length: int) -> None:
        """A row whose prompt was prefilled on its own (``prefill_row``) joins the batch last."""
        ...

    def forward(self, inputs: Sequence[Sequence[int]], positions: Sequence[int]) -> "torch.Tensor":
        """One forward over each row's ``inputs[r]`` (its last token and draft), the first at
        position ``positions[r]``; logits [B, W, vocab], W the longest input (a row's own
        are its first ``len(inputs[r])``)."""
        ...

    def keep(self, kept: Sequence[int]) -> None:
        """After ``forward``: row r keeps the KV of its first ``kept[r]`` inputs."""
        ...

    def drop(self, rows: Sequence[int]) -> None:
        """Rows (indices into the batch) that leave it."""
        ...


def prefill_row(model, tokens: Sequence[int], cache):
    """Run ``tokens`` of one prompt through the model on ``cache`` (batch 1); the logits of the
    last position, [1, vocab]. Called once for a whole prompt, or chunk by chunk.

    Only the last position's logits are computed (``logits_to_keep=1``): for a prompt of
    1,000 tokens the full [1000, vocab] matrix would cost more than the answer's first steps.
    """
    import torch

    input_ids = torch.tensor([list(tokens)], dtype=torch.long)  # [1, P]
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1:]  # [1, vocab]


class TransformersRows:
    """``RowsKV`` for a transformers causal LM: one cache of B rows and S columns, a mask of
    which columns hold a real token for each row, and positions counted per row.

    Rows of different lengths share the columns right-aligned; a row that accepts fewer
    draft tokens than another masks the columns it did not keep. Columns no row uses are
    dropped once ``COMPACT_AFTER`` have piled up, and at once when one row is left, so that
    a batch of one is exactly a lone decode: no mask, no explicit positions, the same
    forward as ``model.generate``.

    Layout for rows A (5 tokens) and B (2 tokens), then B joined by C (3 tokens):

        columns   c0 c1 c2 c3 c4       A valid 1 1 1 1 1
                                       B valid 0 0 0 1 1      C valid 0 0 1 1 1

    With a shared prefix (PiD: ``start_shared``) the prefix's P columns come first and are
    valid for every row; ``share="view"`` keeps them once per layer for the whole batch.
    """

    def __init__(self, model, cache=None, valid=None, prefix_len: int = 0):
        import torch

        self.model = model
        self.cache = cache  # transformers Cache, batch B; None while empty
        self.valid = valid if valid is not None else torch.zeros(0, 0, dtype=torch.bool)  # [B, S] row columns
        self.prefix_len = prefix_len  # shared prefix columns before the rows' own (valid for all)
        self.row_offset = 0  # where the rows' columns start in a layer (``copy`` sharing)
        self._width = 0  # columns of the last forward

    def __len__(self) -> int:
        return self.valid.shape[0]

    # ---- rows joining ------------------------------------------------------------------

    def start_shared(self, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]], share: str = "view"):
        """Start a batch of rows that share ``prefix_ids`` (PiD): the prefix is prefilled
        once at batch 1, then the suffixes as one left-padded batch on top of it. Returns
        the logits of each row's last prompt token, [B, vocab].

        Example: prefix_len 5, suffixes [7, 8, 9] and [4]: input [[7, 8, 9], [pad, pad, 4]],
        positions [[5, 6, 7], [5, 5, 5]], valid [[1, 1, 1], [0, 0, 1]].
        """
        import torch

        from .kv import new_cache

        if len(self):
            raise ValueError("a shared prefix starts an empty batch")
        cache = new_cache(self.model)
        prefix_len = len(prefix_ids)
        if prefix_len:
            prefill_row(self.model, prefix_ids, cache)
        self.cache = share_prefix(cache, len(suffixes), share)
        self.prefix_len = prefix_len
        self.row_offset = prefix_len if share == "copy" else 0
        width = max(len(s) for s in suffixes)
        pad = suffixes[0][-1]  # any id: padded columns are masked
        input_ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in suffixes])  # [B, S]
        valid = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in suffixes])  # [B, S]
        # a row's own tokens count from the prefix; its pads repeat the first position
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0) + prefix_len  # [B, S]
        mask = torch.cat([torch.ones(len(suffixes), prefix_len, dtype=torch.bool), valid], dim=-1)
        with packed_gqa(self.model):
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                past_key_values=self.cache, use_cache=True, logits_to_keep=1,
            )
        self.valid = valid
        return out.logits[:, -1]  # [B, vocab]

    def join(self, row_cache, length: int) -> None:
        """Append a row prefilled alone (a batch-1 cache of ``length`` positions).

        The shorter side is left-padded with masked columns: the batch when the row is
        longer than its columns, else the row.
        """
        import torch

        if self.prefix_len:
            raise ValueError("rows sharing a prefix take no other rows (start a new batch)")
        if self.cache is None or len(self) == 0:
            self.cache = row_cache
            self.valid = torch.ones(1, length, dtype=torch.bool)
            return
        columns = self.valid.shape[1]
        if length > columns:
            self._pad_left(length - columns)
            columns = length
        for layer, row_layer in zip(self.cache.layers, row_cache.layers):
            keys, values = row_layer.keys, row_layer.values  # [1, H, length, D]
            if length < columns:
                keys = torch.nn.functional.pad(keys, (0, 0, columns - length, 0))
                values = torch.nn.functional.pad(values, (0, 0, columns - length, 0))
            layer.keys = torch.cat([layer.keys, keys], dim=0)
            layer.values = torch.cat([layer.values, values], dim=0)
        row_valid = torch.cat([torch.zeros(columns - length, dtype=torch.bool), torch.ones(length, dtype=torch.bool)])
        self.valid = torch.cat([self.valid, row_valid.unsqueeze(0)], dim=0)

    def _pad_left(self, columns: int) -> None:
        import torch

        for layer in self.cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))
        self.valid = torch.cat([torch.zeros(len(self), columns, dtype=torch.bool), self.valid], dim=-1)

    # ---- a step ------------------------------------------------------------------------

    def forward(self, inputs: Sequence[Sequence[int]], positions: Sequence[int]):
        """One forward over every row's ``inputs`` (right-padded to the longest); logits
        [B, W, vocab]. The padded slots come after every real one: no real token attends
        to them, and ``keep`` drops or masks them."""
        import torch

        width = max(len(i) for i in inputs)
        self._width = width
        if len(inputs) == 1 and self.prefix_len == 0 and bool(self.valid.all()):
            # a lone row on an unmasked cache: the plain forward of a lone decode
            input_ids = torch.tensor([list(inputs[0])], dtype=torch.long)  # [1, W]
            return self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=width).logits
        input_ids = torch.tensor([list(i) + [i[-1]] * (width - len(i)) for i in inputs], dtype=torch.long)  # [B, W]
        position_ids = torch.tensor(list(positions)).unsqueeze(-1) + torch.arange(width)  # [B, W]
        rows = len(inputs)
        mask = torch.cat(
            [torch.ones(rows, self.prefix_len, dtype=torch.bool), self.valid, torch.ones(rows, width, dtype=torch.bool)], -1
        )
        with packed_gqa(self.model):
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                past_key_values=self.cache, use_cache=True, logits_to_keep=width,
            )
        return out.logits  # [B, W, vocab]

    def keep(self, kept: Sequence[int]) -> None:
        """Keep each row's first ``kept[r]`` columns of the last forward.

        Example: inputs of 4 and 2 tokens (4 new columns); row 0 keeps 2, row 1 keeps 2:
        the last two columns go from the cache (no row keeps them), the new valid columns
        are [[1, 1], [1, 1]].
        """
        import torch

        longest = max(kept)
        excess = self._width - longest
        if excess > 0:
            self.cache.crop(-excess)
        new = torch.arange(longest).unsqueeze(0) < torch.tensor(list(kept)).unsqueeze(-1)  # [B, longest]
        self.valid = torch.cat([self.valid, new], dim=-1)
        self._compact()

    def drop(self, rows: Sequence[int]) -> None:
        import torch

        if not rows:
            return
        leaving = set(rows)
        keep = [r for r in range(len(self)) if r not in leaving]
        if not keep:
            self.cache, self.prefix_len, self.row_offset = None, 0, 0
            self.valid = torch.zeros(0, 0, dtype=torch.bool)
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index)
        self.valid = self.valid.index_select(0, index)
        self._compact()

    def _compact(self) -> None:
        """Drop the columns no row uses (left padding of rows that left, rejected drafts)
        once ``COMPACT_AFTER`` of them have piled up, or any when one row is left."""
        import torch

        used = self.valid.any(dim=0)
        unused = int((~used).sum())
        if unused == 0 or (unused < COMPACT_AFTER and len(self) > 1):
            return
        if len(self) == 1:
            used = self.valid[0]
        columns = torch.nonzero(used).squeeze(-1)
        offset = self.row_offset
        index = torch.cat([torch.arange(offset), columns + offset]) if offset else columns
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.valid = self.valid.index_select(1, columns)
