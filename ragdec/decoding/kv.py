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
