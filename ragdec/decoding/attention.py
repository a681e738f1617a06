"""Batch-invariant attention: a query row's result does not depend on how many rows are
queried with it, so that verifying [last token, *draft] in one forward gives each position
the bits that decoding it alone gives.

Why: LLMA (and every lossless method) is identical to greedy only if the verify forward
over 1 + k tokens yields, for each position, the logits a one-token step would. The linear
layers keep that on these CPUs (oneDNN computes each output row the same way for 1 to 16
rows, in float32 and bfloat16), but torch's sdpa kernels do not: the one-query path and
the many-query path reduce in different orders. In float32 the difference stays far below
the gap between the two best logits; in bfloat16 it does not (llma matched greedy on 2 of 3
rag prompts before this). Here each query row's scores, softmax and weighted sum are
computed in float32 by the same matmuls whatever the number of rows:

    scores[b, g, i, :] = q[b, g, i] . K[b, g]^T * scale    (the query heads of one key/value
                                                              head stacked: no copy of K, V)
    out[b, g, i] = softmax(scores[b, g, i] + mask) . V[b, g]

Long queries (a prefill) go to sdpa: prefill is not compared position by position, and
its speed is sdpa's (in float32 when the cache keeps float32 keys, as ragdec's caches do,
``kv.py``: as fast as bfloat16's on these cores). Used for models loaded in a 16-bit dtype
(``Generator.load``).

This is the attention's share only. oneDNN's bfloat16 matmul gives the rows after the
first of a many-row product last-bit differences from the one-row product now and then
(seen first in the MLP's down projection, 4864 -> 896, on a real 1,000-token prompt),
which bfloat16's rounding can carry into another greedy choice: float32 stays the
configuration in which lossless methods are identical to greedy (bench/results/
llamacpp_rag_bfloat16.json records how often bfloat16 llma still matched).
"""

from __future__ import annotations

from functools import lru_cache

INVARIANT = "ragdec_invariant"  # the attention implementation's registered name
MAX_INVARIANT_QUERIES = 64  # queries per row up to which attention is computed invariantly (decode, verify)


@lru_cache(maxsize=1)
def register_invariant_attention() -> str:
    """Register ``INVARIANT`` with transformers (once) and return its name."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .batch_kv import packed_gqa_attention

    prefill_attention = packed_gqa_attention()

    def invariant_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        batch, heads, q_len, head_dim = query.shape  # [B, H, q, D]; key, value: [B, H / groups, T, D]
        if q_len > MAX_INVARIANT_QUERIES or dropout or kwargs.get("position_bias") is not None:
            if key.dtype != query.dtype:  # ragdec's caches keep float32 (kv.py): sdpa takes one dtype
                out, weights = prefill_attention(module, query.to(key.dtype), key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
                return out.to(query.dtype), weights
            return prefill_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        kv_heads, kv_len = key.shape[1], key.shape[-2]
        groups = heads // kv_heads
        scale = scaling if scaling is not None else head_dim**-0.5
        stacked = query.float().reshape(batch, kv_heads, groups * q_len, head_dim)
        scores = torch.matmul(stacked, key.float().transpose(-1, -2)).mul_(scale)  # [B, Hkv, G*q, T]
        scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
        if attention_mask is None:  # sdpa_mask leaves out a plain causal mask
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril_(kv_len - q_len)  # [q, T]
        else:  # [B, 1, q, T] booleans
            allowed = attention_mask[:, :, :, -kv_len:].unsqueeze(2)  # [B, 1, 1, q, T]
        # the lowest float, not -inf: a row whose keys are all masked (padding) stays finite
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * q_len, kv_len)
        out = torch.matmul(probs, value.float()).view(batch, heads, q_len, head_dim).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None  # [B, q, H, D]

    AttentionInterface.register(INVARIANT, invariant_attention)
    AttentionMaskInterface.register(INVARIANT, sdpa_mask)
    return INVARIANT


def use_invariant_attention(model) -> None:
    """Switch ``model`` (a transformers causal LM using sdpa) to ``INVARIANT``."""
    if model.config._attn_implementation in ("sdpa", INVARIANT):
        model.config._attn_implementation = register_invariant_attention()
