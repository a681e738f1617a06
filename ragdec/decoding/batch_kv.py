"""KV cache and attention for a batch whose rows share a prompt prefix (PiD).

- ``share_prefix``: a cache holding the prefix at batch size 1 serves B rows, the prefix
  kept once per layer (``SharedPrefixLayer``) or repeated per row;
- ``packed_gqa``: sdpa over grouped-query heads without copying the keys and values per
  query head, for batched forwards over several tokens with a padding mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

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
    """Register ``PACKED_GQA``: sdpa that never repeats the key/value heads.

    With grouped-query attention (Qwen2.5 0.5B: 14 query heads, 2 key/value heads) and a
    mask, transformers' sdpa repeats every layer's keys and values per query head when more
    than one token is queried: at 20 rows on 500 cached positions that copy makes a verify
    over 2 tokens per row cost 2.7x one over 1 token (Qwen 0.5B, 2 CPU cores). Stacking the
    queries of each key/value head instead (what transformers already does for one token)
    gives the kernel the shared keys as they are.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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

    AttentionInterface.register(PACKED_GQA, packed_gqa_sdpa)
    AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)
    return PACKED_GQA


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
