"""The teacher both FREE trainings learn from: the model's own greedy answers, batched."""

from __future__ import annotations

from typing import Sequence


def batched_greedy(model, prompts: Sequence[Sequence[int]], eos_token_ids, pad_token_id: int, batch_prompts: int,
                   max_new_tokens: int, progress: bool, desc: str, **outputs):
    """The model's greedy answers to ``prompts``, batched by length (left-padded): yields,
    per batch, (prompt indices, ``generate``'s output, answers [B, S], running [B, S]),
    where ``running`` marks the steps up to and including the one that yields EOS.
    ``outputs``: what ``generate`` returns besides the tokens (output_logits=True, ...)."""
    import torch
    from tqdm import tqdm

    eos = torch.tensor(sorted(eos_token_ids) or [-1])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_prompts] for i in range(0, len(order), batch_prompts)]
    for batch in tqdm(batches, desc=desc, disable=not progress):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad_token_id] * (width - len(prompts[i])) + list(prompts[i]) for i in batch])
        attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad_token_id, return_dict_in_generate=True, **outputs,
            )
        answer = out.sequences[:, width:]  # [B, S]
        is_eos = torch.isin(answer, eos).int()
        yield batch, out, answer, is_eos.cumsum(1) - is_eos == 0  # running: no EOS strictly before step s
