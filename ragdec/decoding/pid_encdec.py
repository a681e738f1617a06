"""PiD for encoder-decoder models (T5, BART family): prompt-in-decoder.

The encoder reads the document once; each question is a decoder prompt, and all of them
decode in one batch that shares the encoder output and, in every decoder layer, the
cross-attention keys and values computed from it (one [1, H, L, D] copy per layer,
expanded to the batch as a view):

1. encode the document, batch size 1;
2. fill the cross-attention cache once, batch size 1 (a one-token decoder forward), then
   expand it to the batch;
3. prefill the decoder prompts ``[decoder_start, *question]`` left-padded and masked;
4. decode greedily, all rows at once; rows that reach EOS or the budget leave the batch.

Left padding keeps each row exact: T5's decoder self-attention bias depends only on the
distance between two positions, which padding before a row's first token does not change,
and padded positions are masked. No pretrained encoder-decoder weights are obtainable
on these machines; the tests run small random T5 configurations against
``model.generate`` of each question alone.
"""

from __future__ import annotations

from typing import Sequence


def encdec_pid_generate(
    model,
    document_ids: Sequence[int],
    questions_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Answer every question about the document in one batch; greedy tokens per question
    (EOS included where reached), as ``model.generate`` gives for that question alone
    with ``decoder_input_ids = [decoder_start, *question]``.

    Example: document "Paris is the capital of France." and questions "capital?",
    "country?": the encoder runs once over the document; the decoder batch is
    [[start, capital, ?], [pad, start, country, ?]] (the second row's pad masked), and
    both answers decode together.
    """
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not questions_ids:
        return []
    config = model.config
    start_id = config.decoder_start_token_id
    if eos_token_ids is None:
        eos = model.generation_config.eos_token_id
        eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
    eos_set = set(eos_token_ids)
    prompts = [[start_id, *q] for q in questions_ids]
    rows = list(range(len(prompts)))  # the caller's index of each batch row
    answers: list[list[int]] = [[] for _ in prompts]

    with torch.inference_mode():
        # 1. encode the document once
        encoder_out = model.get_encoder()(input_ids=torch.tensor([list(document_ids)]))
        encoded = encoder_out.last_hidden_state  # [1, L, d_model]
        # 2. cross-attention keys/values once, at batch size 1
        cross = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        model(encoder_outputs=encoder_out, decoder_input_ids=torch.tensor([[start_id]]), past_key_values=cross, use_cache=True)
        shared_cross = [(layer.keys, layer.values) for layer in cross.cross_attention_cache.layers]  # [1, H, L, D]

        def cache_for(batch: int, self_cache):
            cache = EncoderDecoderCache(self_cache, DynamicCache(config=config))
            for layer_idx, (keys, values) in enumerate(shared_cross):
                cache.cross_attention_cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer_idx)
                cache.is_updated[layer_idx] = True
            return cache

        # 3. prefill the decoder prompts, left-padded
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[start_id] * (width - len(p)) + p for p in prompts])  # [B, S]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, S]
        cache = cache_for(len(prompts), DynamicCache(config=config))
        batch_encoded = encoded.expand(len(prompts), -1, -1)
        out = model(
            encoder_outputs=(batch_encoded,), decoder_input_ids=input_ids, decoder_attention_mask=mask,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        # 4. decode greedily, rows leaving as they finish
        while rows:
            next_ids = out.logits[:, -1].argmax(-1).tolist()  # [B]
            keep = []
            for r, token in enumerate(next_ids):
                answers[rows[r]].append(token)
                if token not in eos_set and len(answers[rows[r]]) < max_new_tokens:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep)
                cache.self_attention_cache.batch_select_indices(index)
                cache = cache_for(len(keep), cache.self_attention_cache)  # the shared cross part, re-expanded
                mask = mask.index_select(0, index)
                rows = [rows[r] for r in keep]
                next_ids = [next_ids[r] for r in keep]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=-1)
            out = model(
                encoder_outputs=(encoded.expand(len(rows), -1, -1),), decoder_input_ids=torch.tensor(next_ids).unsqueeze(-1),
                decoder_attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
    return answers
