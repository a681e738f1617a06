"""Calibrate FREE's exit head: train the adapter by distillation from the deep model.

FREE's loss (layer-wise knowledge distillation): the shallow exit's distribution should
match the deep model's (cross-entropy to the deep distribution) and its hidden state the
deep model's final one (mean squared error, after the final norm, where the LM head reads
it). Only the adapter learns; the model's layers, norm and LM head stay frozen.

What the adapter learns from matters more than how long it trains. Two sources:

- ``answers`` (the default): the model's own greedy answers to prompts, with the prompt as
  context. These are the positions FREE decodes, so the exit head learns the model's own
  phrasing and what it copies from the prompt. On qwen2.5-coder-0.5b at layer 12, scored on
  held-out answers: 31% top-1 agreement for the adapter trained on answers, 24% for the
  one trained on news text.
- ``text``: teacher-forced windows of a corpus (``read_texts``/``sequences``), for a
  model with no prompts at hand.

To run in minutes on two CPU cores:

1. The teacher runs once. In ``answers`` mode it *is* the generation: one batched greedy
   ``generate`` per group of prompts keeps, at every answer position, the exit layer's
   hidden state, the deep final hidden state (normed) and the deep model's top ``top_k``
   tokens and probabilities. It runs on a bfloat16 copy of the model by default
   (``teacher_dtype``): a bfloat16 prefill is an order of magnitude faster on CPUs with
   AMX, and the adapter only needs the targets' shape, not their last bit. The first
   ``exit_layer`` layers are frozen, so the adapter's input never changes and epochs cost
   no forwards.
2. Each step scores only the batch's candidate tokens (the union of the teacher's top-k at
   its positions, a few hundred of the 150k-token vocabulary), with the deep distribution
   renormalized over them: the LM head's cost drops by the vocabulary over that set.
3. Held-out prompts (every ``heldout_every``-th) measure, before and after: top-1
   agreement (shallow argmax == deep argmax over the full vocabulary) and, at confidence
   thresholds, the share of positions that would exit and how often those agree.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ragdec.decoding.free import adapter_path, exit_adapter
from ragdec.files import atomic_path, iter_jsonl

from .teacher import batched_greedy

REPORT_CONFIDENCES = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class CalibrationConfig:
    exit_layers: tuple[int, ...]  # one adapter per layer, all from one teacher run
    steps: int = 2000  # optimizer steps over the cached teacher outputs (no forwards of the model: cheap)
    # adapter rank; qwen2.5-coder-0.5b at layer 12 on news text, held-out agreement: 33.8%
    # at rank 64 and 500 steps, 37.3% at rank 256 and 2000 steps
    rank: int = 256
    lr: float = 2e-3
    mse_weight: float = 1.0  # hidden-state matching beside the cross-entropy
    batch_positions: int = 256  # positions per step
    top_k: int = 32  # teacher tokens kept per position
    seed: int = 0
    teacher_dtype: str | None = "bfloat16"  # the teacher's copy of the model; None: the model as loaded
    # answers mode
    answer_tokens: int = 64  # greedy tokens per prompt
    batch_prompts: int = 12  # prompts per batched generate
    heldout_every: int = 5  # every n-th prompt is held out
    # text mode
    seq_len: int = 64  # tokens per training window
    train_sequences: int = 160  # 160 x 64 = 10,240 training positions
    heldout_sequences: int = 16


@dataclass(frozen=True)
class CalibrationReport:
    model: str
    exit_layer: int
    source: str  # "answers" or "text"
    steps: int
    train_positions: int
    heldout_positions: int
    agreement_before: float  # held-out share of positions where shallow argmax == deep argmax
    agreement_after: float
    # after training, per confidence threshold: the held-out share of positions whose exit
    # head is that confident ("exit") and the share of those that agree ("precision")
    exits_after: dict = field(default_factory=dict)
    path: str = ""  # where the adapter was saved

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Teacher:
    """The frozen model's outputs at the training positions, flat over positions."""

    exit_hidden: dict  # exit layer -> [N, H] its hidden states (the adapter's input)
    deep: object  # [N, H] the deep final hidden states, after the final norm
    top_probs: object  # [N, k] the deep model's top-k probabilities
    top_ids: object  # [N, k] and their token ids (column 0 is the argmax)


def _concat(parts: list[tuple]) -> Teacher:
    import torch

    layers = parts[0][0].keys()
    exit_hidden = {layer: torch.cat([p[0][layer] for p in parts]) for layer in layers}
    return Teacher(exit_hidden, *(torch.cat([p[i] for p in parts]) for i in range(1, 4)))


# ---- text mode ------------------------------------------------------------------------


def read_texts(path: Path, limit: int = 2000) -> list[str]:
    """Texts of a .jsonl file (field document, text, context or summary, the first present)
    or of a plain text file (paragraphs)."""
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for _, record in iter_jsonl(path):
            for key in ("document", "text", "context", "article", "docs", "summary"):
                value = record.get(key)
                if isinstance(value, list):  # a list of passages (llma_cnndm's docs)
                    value = "\n\n".join(v for v in value if isinstance(v, str))
                if isinstance(value, str) and value.strip():
                    texts.append(value)
                    break
            if len(texts) >= limit:
                break
    else:
        texts = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()][:limit]
    if not texts:
        raise ValueError(f"no text found in {path}: give a .jsonl file with a 'document' or 'text' field, or a text file")
    return texts


def sequences(tokenizer, texts: Sequence[str], seq_len: int, count: int, per_text: int = 4) -> list[list[int]]:
    """Up to ``count`` token windows of ``seq_len``, at most ``per_text`` consecutive ones
    from each text (texts too short skipped)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, min(len(ids) - seq_len + 1, per_text * seq_len), seq_len):
            out.append(ids[start : start + seq_len])
        if len(out) >= count:
            out = out[:count]
            break
    if len(out) < count:
        raise ValueError(
            f"only {len(out)} windows of {seq_len} tokens in the text, {count} needed: "
            "give more text, or lower --seq-len or --train-sequences"
        )
    return out


def teacher_pass(model, exit_layers: Sequence[int], ids):
    """One frozen forward over ``ids`` [B, T]: the hidden states entering each exit layer
    (layer -> [B, T, H]), the deep final hidden states after the norm [B, T, H] and the
    deep logits [B, T, V]."""
    import torch
    from transformers.masking_utils import create_causal_mask

    base = model.model
    hidden = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = create_causal_mask(model.config, hidden, None, None, positions, allow_is_causal_skip=False)
    rotary = base.rotary_emb(hidden, positions)
    exit_hidden = {}
    for i, layer in enumerate(base.layers):
        if i in exit_layers:
            exit_hidden[i] = hidden
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    deep = base.norm(hidden)
    return exit_hidden, deep, model.lm_head(deep)


def _positions(exit_hidden: dict, deep, logits, top_k: int) -> tuple:
    """Flatten a teacher's {layer: [.., H]}, [.., H], [.., V] outputs to the four Teacher
    fields (float32)."""
    probs, ids = logits.float().softmax(-1).topk(top_k, dim=-1)
    flat = {layer: h.float().flatten(0, -2) for layer, h in exit_hidden.items()}
    return (flat, deep.float().flatten(0, -2), probs.flatten(0, -2), ids.flatten(0, -2))


def text_teacher(model, tokenizer, texts: Sequence[str], config: CalibrationConfig, progress: bool) -> tuple[Teacher, Teacher]:
    """(train, held-out) teachers over token windows of ``texts``."""
    import torch
    from tqdm import tqdm

    windows = sequences(tokenizer, texts, config.seq_len, config.train_sequences + config.heldout_sequences)
    split = {"train": windows[: config.train_sequences], "heldout": windows[config.train_sequences :]}
    out = {}
    with torch.no_grad():
        for name, rows in split.items():
            chunks = list(torch.split(torch.tensor(rows), 4))  # a few at a time: logits are [T, V]
            out[name] = _concat([
                _positions(*teacher_pass(model, config.exit_layers, chunk), config.top_k)
                for chunk in tqdm(chunks, desc=f"teacher ({name})", disable=not progress)
            ])
    return out["train"], out["heldout"]


# ---- answers mode ---------------------------------------------------------------------


def answers_teacher(model, prompts: Sequence[Sequence[int]], eos_token_ids, pad_token_id: int,
                    config: CalibrationConfig, progress: bool) -> tuple[Teacher, Teacher]:
    """(train, held-out) teachers from the model's greedy answers to ``prompts``.

    Prompts are batched by length (left-padded); each generation step yields, for every
    answer still running, its position: the exit-layer hidden state of the token just
    placed and the deep model's distribution over the next one. A position up to and
    including the one that predicts EOS counts; the padding after it does not.
    """
    import torch

    parts: dict[str, list] = {"train": [], "heldout": []}
    for batch, out, answer, running in batched_greedy(
        model, prompts, eos_token_ids, pad_token_id, config.batch_prompts, config.answer_tokens, progress, "answers",
        output_hidden_states=True, output_logits=True,
    ):
        # hidden_states[step][i]: what enters layer i (the embeddings at i = 0); [-1]: normed
        exit_hidden = {i: torch.stack([h[i][:, -1] for h in out.hidden_states], 1) for i in config.exit_layers}  # [B, S, H]
        deep = torch.stack([h[-1][:, -1] for h in out.hidden_states], 1)
        logits = torch.stack(out.logits, 1)  # [B, S, V]
        for row, prompt_index in enumerate(batch):
            keep = running[row]
            split = "heldout" if prompt_index % config.heldout_every == 0 else "train"
            hidden = {i: h[row][keep] for i, h in exit_hidden.items()}
            parts[split].append(_positions(hidden, deep[row][keep], logits[row][keep], config.top_k))
    if not parts["train"] or not parts["heldout"]:
        raise ValueError(f"{len(prompts)} prompts are too few to hold out every {config.heldout_every}th: give more")
    return _concat(parts["train"]), _concat(parts["heldout"])


# ---- training and measuring --------------------------------------------------------------


def exit_agreement(model, adapter, teacher: Teacher, layer: int):
    """At each position: the exit head's confidence (top probability over the full
    vocabulary) and whether its argmax equals the deep model's."""
    import torch

    confidence, predicted = [], []
    with torch.no_grad():
        for chunk in torch.split(teacher.exit_hidden[layer], 512):  # [512, V] logits at a time
            hidden = adapter(chunk) if adapter is not None else chunk
            probs = model.lm_head(model.model.norm(hidden.to(model.lm_head.weight.dtype))).float().softmax(-1)
            c, p = probs.max(-1)
            confidence.append(c)
            predicted.append(p)
    return torch.cat(confidence), torch.cat(predicted) == teacher.top_ids[:, 0]


def exit_profile(confidence, agree, confidences=REPORT_CONFIDENCES) -> dict:
    """Per confidence threshold: the share of positions that reach it and the share of
    those where the exit head agrees with the deep model (``exit_agreement``'s output)."""
    out = {}
    for c in confidences:
        exits = confidence >= c
        out[str(c)] = {
            "exit": round(exits.float().mean().item(), 4),
            "precision": round(agree[exits].float().mean().item(), 4) if exits.any() else None,
        }
    return out


def train_adapter(model, teacher: Teacher, layer: int, config: CalibrationConfig, progress: bool):
    """FREE's distillation loss over the cached teacher, ``config.steps`` AdamW steps."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    adapter = exit_adapter(model.config.hidden_size, config.rank)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    head, norm = model.lm_head.weight.float(), copy.deepcopy(model.model.norm).float()
    inputs = teacher.exit_hidden[layer]
    positions = inputs.shape[0]
    rng = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc=f"adapter (layer {layer})", disable=not progress)
    for _ in bar:
        batch = torch.randint(positions, (config.batch_positions,), generator=rng)
        candidates, local = torch.unique(teacher.top_ids[batch], return_inverse=True)  # [C], [B, k]
        target = torch.zeros(len(batch), len(candidates))
        target.scatter_(1, local, teacher.top_probs[batch])
        target = target / target.sum(-1, keepdim=True)  # the deep distribution over the candidates
        student = norm(adapter(inputs[batch]))  # [B, H]
        log_probs = (student @ head[candidates].T).log_softmax(-1)  # [B, C]
        cross_entropy = -(target * log_probs).sum(-1).mean()
        mse = (student - teacher.deep[batch]).pow(2).mean()
        loss = cross_entropy + config.mse_weight * mse
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(ce=f"{cross_entropy.item():.3f}", mse=f"{mse.item():.3f}")
    return adapter.eval()


def teacher_model(model, dtype_name: str | None):
    """The model the teacher runs: a copy in ``dtype_name`` when that differs, else itself."""
    from ragdec.decoding.generator import torch_dtype

    dtype = torch_dtype(dtype_name) if dtype_name else None
    if dtype is None or dtype == next(model.parameters()).dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def calibrate(generator, config: CalibrationConfig, prompts: Sequence[Sequence[int]] | None = None,
              data: Path | None = None, out: Path | None = None, progress: bool = True) -> list[CalibrationReport]:
    """Train an adapter of ``generator``'s model at each of ``config.exit_layers`` on its
    own answers to ``prompts`` (token ids, chat template applied), or on windows of the
    text file ``data``; save each to ``adapter_path`` (or ``out``, with one layer) and
    report held-out agreement before and after, per layer."""
    from safetensors.torch import save_file

    if (prompts is None) == (data is None):
        raise ValueError("calibrate on prompts (the model's own answers) or on a text file, one of the two")
    model, tokenizer = generator.model, generator.tokenizer
    depth = len(model.model.layers)
    layers = sorted(set(config.exit_layers))
    if not layers or not all(0 < layer < depth for layer in layers):
        raise ValueError(f"exit layers must be between 1 and {depth - 1} for this {depth}-layer model, got {config.exit_layers}")
    if out is not None and len(layers) > 1:
        raise ValueError("--out names one adapter file: give one exit layer with it")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    teacher = teacher_model(model, config.teacher_dtype)
    if prompts is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(generator.eos_token_ids)
        train, heldout = answers_teacher(teacher, prompts, generator.eos_token_ids, pad, config, progress)
        source = "answers"
    else:
        texts = read_texts(Path(data))
        random.Random(config.seed).shuffle(texts)
        train, heldout = text_teacher(teacher, tokenizer, texts, config, progress)
        source = "text"
    del teacher

    reports = []
    for layer in layers:
        before = exit_agreement(model, None, heldout, layer)[1].float().mean().item()
        adapter = train_adapter(model, train, layer, config, progress)
        confidence, agree = exit_agreement(model, adapter, heldout, layer)
        after = agree.float().mean().item()
        # the adapter alone
        path = Path(out) if out else adapter_path(generator.name, layer)
        metadata = {"exit_layer": str(layer), "source": source, "agreement_before": f"{before:.4f}", "agreement_after": f"{after:.4f}"}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in adapter.state_dict().items()}, str(tmp), metadata=metadata)
        reports.append(CalibrationReport(
            model=generator.name, exit_layer=layer, source=source, steps=config.steps,
            train_positions=train.deep.shape[0], heldout_positions=heldout.deep.shape[0],
            agreement_before=round(before, 4), agreement_after=round(after, 4),
            exits_after=exit_profile(confidence, agree), path=str(path),
        ))
    return reports
