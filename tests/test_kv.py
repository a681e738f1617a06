"""ragdec's growing cache layers hold exactly what transformers' DynamicCache holds."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ragdec.decoding.kv import ROOM, copy_cache, crop_to, kv_len, new_cache

from conftest import tiny_causal_lm


def _states(length: int, seed: int, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, length, 8, generator=generator).to(dtype) for _ in range(2)]


def _assert_same(ours, theirs):
    assert kv_len(ours) == kv_len(theirs)
    for mine, plain in zip(ours.layers, theirs.layers):
        assert mine.keys.dtype == torch.float32
        assert torch.equal(mine.keys, plain.keys.float()) and torch.equal(mine.values, plain.values.float())


def test_growing_layers_hold_what_dynamic_cache_holds_through_crops_copies_and_assignments(tiny_tokenizer):
    model = tiny_causal_lm("qwen2", len(tiny_tokenizer), seed=2, layers=2)
    ours, theirs = new_cache(model), DynamicCache(config=model.config)
    assert type(ours.layers[0]).__name__ == "GrowingLayer"
    steps = [(37, "update"), (1, "update"), (5, "update"), (3, "crop"), (ROOM + 9, "update"), (4, "copy"), (2, "assign"), (6, "update")]
    for seed, (count, action) in enumerate(steps):
        if action == "update":
            for index in range(2):
                keys, values = _states(count, seed * 10 + index)
                returned = ours.update(keys, values, index)
                theirs.update(keys, values, index)
                assert torch.equal(returned[0], theirs.layers[index].keys.float())
        elif action == "crop":
            crop_to(ours, kv_len(ours) - count)
            crop_to(theirs, kv_len(theirs) - count)
        elif action == "copy":  # a copy grows on its own: the original keeps its positions
            before = copy_cache(ours)
            keys, values = _states(count, 99)
            ours.update(keys, values, 0)
            ours.update(keys, values, 1)
            theirs.update(keys, values, 0)
            theirs.update(keys, values, 1)
            assert kv_len(before) == kv_len(ours) - count
            _assert_same(before, _cropped(theirs, count))
        else:  # the batched loop assigns new tensors: the next update starts a new buffer
            for mine, plain in zip(ours.layers, theirs.layers):
                mine.keys, mine.values = mine.keys[:, :, count:].clone(), mine.values[:, :, count:].clone()
                plain.keys, plain.values = plain.keys[:, :, count:], plain.values[:, :, count:]
        _assert_same(ours, theirs)


def _cropped(cache, count: int):
    shorter = copy_cache(cache)
    crop_to(shorter, kv_len(shorter) - count)
    return shorter
