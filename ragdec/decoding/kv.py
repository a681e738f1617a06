"""KV-cache helpers. transformers' cache API has changed between releases; everything
ragdec does to a cache goes through here."""

from __future__ import annotations

from functools import lru_cache

ROOM = 256  # positions a growing layer allocates past what it holds


def new_cache(model):
    """An empty growable cache for ``model``: transformers' DynamicCache whose full-attention
    layers are ``GrowingLayer``s (float32 buffers with room to grow; see there)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [_growing_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@lru_cache(maxsize=1)
def _growing_layer_class():
    """``GrowingLayer``, made on first use so that importing this module stays light."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that writes new positions into float32 buffers with ``ROOM``
        positions to spare, its ``keys``/``values`` being views of them.

        Why: DynamicLayer concatenates every step, copying the whole cache of every layer
        for each token (about 11 MB a step for qwen 0.5B after 1,000 tokens), and a 16-bit
        model's attention (``attention.py``) converts the keys and values to float32 on
        every step too. Here a step writes only its own positions, converted once. The
        values are those bits either way, so nothing a method computes changes.

        Code that assigns ``keys``/``values`` (cropping views them; the batched loop
        concatenates rows, pads, selects) is followed: a layer whose keys are no longer a
        view of its buffer copies them into a new one on the next update.
        """

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.dtype = torch.float32
            self.keys, self.values = self.keys.float(), self.values.float()
            self._key_room = self._value_room = None

        def _owns(self, tensor, room) -> bool:
            return (room is not None and tensor.dim() == 4 and tensor.data_ptr() == room.data_ptr()
                    and tensor.shape[:2] == room.shape[:2] and tensor.stride() == room.stride())

        def _write(self, held, new, room):
            """``held`` with ``new`` appended along the positions, in ``room`` or a larger
            buffer: (the view of the whole, the buffer)."""
            length = held.shape[-2] if held.dim() == 4 else 0  # an empty layer holds tensor([])
            end = length + new.shape[-2]
            if not self._owns(held, room) or room.shape[-2] < end:
                shape = (*new.shape[:2], end + ROOM, new.shape[-1])
                grown = torch.empty(shape, dtype=torch.float32, device=new.device)
                if length:
                    grown[:, :, :length].copy_(held)
                room = grown
            room[:, :, length:end].copy_(new)
            return room[:, :, :end], room

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self._key_room = self._write(self.keys, key_states, self._key_room)
            self.values, self._value_room = self._write(self.values, value_states, self._value_room)
            return self.keys, self.values

    return GrowingLayer


def kv_len(cache) -> int:
    """Number of positions the cache holds."""
    return cache.get_seq_length()


def crop_to(cache, length: int) -> None:
    """Drop cached positions past ``length``.

    Example: after verifying ``[last, d1, d2, d3]`` on a cache of 10 positions the cache
    holds 14; if only d1 stood, ``crop_to(cache, 12)`` keeps ``last`` and d1.
    """
    excess = kv_len(cache) - length
    if excess > 0:
        cache.crop(-excess)  # transformers 5: a negative count removes that many


def copy_cache(cache):
    """An independent copy of ``cache`` (its tensors cloned), to decode on without
    changing the original."""
    import copy

    return copy.deepcopy(cache)


class PrefixStore:
    """The KV of prompt prefixes that recur, so that their prefill runs once.

    A fixed system prompt opens every RAG request, and in a chat each prompt begins with
    the previous one's history; on a CPU, where prefill of a 0.5B model reads a long prompt
    in seconds (bench/results/prefill_chunk.json), re-reading them is most of the time to
    the first token. The store keeps
    the cache of up to ``capacity`` prefixes (least recently used dropped first) and
    hands out copies.

    Example: prompts A = [s1 s2 s3 q1 q2] and B = [s1 s2 s3 r1] with ``prefix_len`` 3:
    A's prefill runs over [s1 s2 s3], keeps a copy, then runs over [q1 q2]; B starts from
    a copy of the kept cache and runs over [r1] only.

    A conversation's next turn extends its kept history: the shorter entry it grew from
    is dropped then, unless more than one request has used it (a system prompt that every
    request shares stays). So a conversation holds one entry, not one per turn, and many
    live conversations fit: with turns [s h1] then [s h1 h2], [s h1] goes when
    [s h1 h2] is kept, while [s], used by every conversation, stays.
    """

    # a server keeps one history per live conversation: 24 covers the conversations of
    # two batches of 8 and their shared system prompts (a 600-token prefix of qwen 0.5B
    # holds about 15 MB of float32 KV)
    def __init__(self, capacity: int = 24):
        from collections import OrderedDict

        self.capacity = capacity
        self._entries: "OrderedDict[tuple[int, ...], object]" = OrderedDict()
        self._uses: dict[tuple[int, ...], int] = {}  # requests that started from each entry

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._uses.clear()

    def longest(self, tokens) -> tuple[object | None, int]:
        """The kept cache of the longest kept prefix of ``tokens`` (a copy) and its length;
        (None, 0) when none is kept."""
        best = None
        for key in self._entries:
            if len(key) <= len(tokens) and (best is None or len(key) > len(best)) and tuple(tokens[: len(key)]) == key:
                best = key
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        self._uses[best] = self._uses.get(best, 0) + 1
        return copy_cache(self._entries[best]), len(best)

    def keep(self, tokens, cache) -> None:
        """Keep a copy of ``cache``, which holds exactly ``tokens``."""
        if self.capacity <= 0 or not tokens:
            return
        key = tuple(tokens)
        grown_from = [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k and self._uses.get(k, 0) <= 1]
        for shorter in grown_from:
            del self._entries[shorter]
            self._uses.pop(shorter, None)
        self._entries[key] = copy_cache(cache)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            dropped, _ = self._entries.popitem(last=False)
            self._uses.pop(dropped, None)
