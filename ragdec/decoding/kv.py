"""KV-cache helpers. transformers' cache API has changed between releases; everything
ragdec does to a cache goes through here."""

from __future__ import annotations


def new_cache(model):
    """An empty growable cache for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


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
    the previous one's history; on a CPU, where prefill runs at about 130 tokens/s on a
    0.5B model, re-reading them is most of the time to the first token. The store keeps
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
