"""Train a model for FREE: shallow-deep fine-tuning, so that the first layers learn to exit.

Calibration (``free_calibrate.py``) trains an adapter on frozen layers and finds only what
the layers already know: qwen2.5-coder-0.5b's exit head agrees with the deep model on 37%
of positions at layer 16 of 24. The FREE paper (Bae et al., 2023) fine-tunes the model
itself with a weighted sum of the losses at the exit layer and at the last layer. This
module does that on a CPU:

- **Data**: the original model's own greedy answers to prompts (the calibration prompts:
  benchmark workloads past the prompts the benchmarks use), generated once in a batched
  ``generate`` that also keeps the original model's top-``top_k`` next-token
  distribution at every answer position (the teacher).
- **Loss** at every answer position: ``shallow_weight * KD(exit head) + (1 - shallow_weight)
  * KD(deep head)``, each the cross-entropy of the head's log-softmax against the teacher's
  top-k distribution (renormalized). The exit head is the model's own final norm and LM
  head on the exit layer's hidden state (FREE's shallow model, no adapter); distilling the
  deep head from the original keeps its answers the original's.
- **What learns**: every decoder layer and the final norm (the embeddings and the tied LM
  head stay), or with ``lora_rank`` a low-rank update of the first ``exit_layer`` layers'
  linear maps only (merged into the weights at the end).
- **Cost**: the prompt runs without gradient and only the answer (``answer_tokens``
  positions, where the loss lives) runs forward and backward over the prompt's KV.

The run writes into ``out``: ``train/teacher.pt`` (the answers and their teacher
distributions, written once), ``train/checkpoint.pt`` (every ``checkpoint_every`` steps,
atomically: trainable weights, optimizer, step, the agreement curve), so an interrupted
run resumes where its last checkpoint stands; at the end a model folder (config,
safetensors weights, tokenizer) and ``ragdec_free.json`` (the exit layer, the curve, the
time taken), written last: the zoo, ``generate``, ``bench`` and the pipeline load the
folder by path, and FREE takes its exit layer from that file.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ragdec.decoding.free import FREE_META
from ragdec.files import atomic_path, durable_rename, write_json


@dataclass(frozen=True)
class TrainConfig:
    exit_layer: int
    steps: int = 400  # optimizer steps
    lora_rank: int | None = None  # None: full fine-tuning of the layers; R: LoRA on the first exit_layer layers
    lr: float | None = None  # None: 1e-4 full, 1e-3 LoRA
    shallow_weight: float = 0.5  # the exit head's share of the loss; the rest is the deep head's
    sequences_per_step: int = 4  # answers per optimizer step (gradient accumulation)
    answer_tokens: int = 64  # greedy tokens per teacher answer
    top_k: int = 32  # teacher tokens kept per position
    batch_prompts: int = 8  # prompts per batched teacher generate
    heldout_every: int = 5  # every n-th prompt is held out
    heldout_sequences: int = 24  # held-out answers scored at each evaluation
    eval_every: int = 50  # steps between held-out evaluations (and the curve's points)
    checkpoint_every: int = 50  # steps between checkpoints
    warmup_steps: int = 20
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.lora_rank else 1e-4

    def key(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "eval_every", "checkpoint_every")}


@dataclass
class TrainReport:
    model: str
    out: str
    exit_layer: int
    steps: int
    trainable_parameters: int
    train_answers: int
    heldout_answers: int
    train_positions: int
    seconds: float  # training (teacher included), summed over resumed runs
    teacher_seconds: float
    curve: list = field(default_factory=list)  # [{step, loss, exit_agreement, deep_fidelity}]
    agreement_by_layer_before: dict = field(default_factory=dict)
    agreement_by_layer_after: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- LoRA ------------------------------------------------------------------------------


def _lora_linear(base, rank: int, alpha: float | None = None):
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """``base(x) + (x @ A.T @ B.T) * scale``; B starts at zero, so training starts from the model."""

        def __init__(self):
            super().__init__()
            self.base = base
            self.scale = (alpha or rank) / rank
            self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

        def merged(self):
            with torch.no_grad():
                self.base.weight += (self.lora_b @ self.lora_a) * self.scale
            return self.base

    return LoRALinear()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, layers: int, rank: int) -> list:
    """Wrap the linear maps of the first ``layers`` decoder layers; returns the wrappers."""
    wrapped = []
    for layer in model.model.layers[:layers]:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                linear = getattr(parent, name, None)
                if linear is not None:
                    lora = _lora_linear(linear, rank)
                    setattr(parent, name, lora)
                    wrapped.append((parent, name, lora))
    return wrapped


def merge_lora(wrapped: list) -> None:
    for parent, name, lora in wrapped:
        setattr(parent, name, lora.merged())


# ---- the teacher -----------------------------------------------------------------------


def teacher_answers(model, prompts: Sequence[Sequence[int]], eos_token_ids, pad_token_id: int,
                    config: TrainConfig, progress: bool) -> list[dict]:
    """The original model's greedy answer to each prompt (up to and including EOS) and its
    top-k distribution at each answer position: [{prompt, answer, top_ids, top_probs}]."""
    import torch

    from .teacher import batched_greedy

    records: list[dict | None] = [None] * len(prompts)
    for batch, out, answer, running in batched_greedy(
        model, prompts, eos_token_ids, pad_token_id, config.batch_prompts, config.answer_tokens, progress,
        "teacher answers", output_logits=True,
    ):
        probs, top = torch.stack(out.logits, 1).float().softmax(-1).topk(config.top_k, dim=-1)
        for row, index in enumerate(batch):
            keep = int(running[row].sum())
            records[index] = {
                "prompt": list(prompts[index]),
                "answer": answer[row, :keep].tolist(),
                "top_ids": top[row, :keep].clone(),
                "top_probs": probs[row, :keep].half().clone(),
            }
    return [r for r in records if r is not None and r["answer"]]


# ---- one forward over an answer ----------------------------------------------------------


def answer_forward(model, record: dict, exit_layers: Sequence[int]):
    """Run the prompt without gradient, then the answer positions over its KV: returns
    ({layer: hidden [S, H]} for each exit layer, deep logits [S, V]); row j predicts
    ``answer[j]``."""
    import torch

    from ragdec.decoding.kv import new_cache

    prompt, answer = record["prompt"], record["answer"]
    cache = new_cache(model)
    with torch.no_grad():
        if len(prompt) > 1:
            model(torch.tensor([prompt[:-1]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    inputs = torch.tensor([[prompt[-1], *answer[:-1]]])
    out = model(inputs, past_key_values=cache, use_cache=True, output_hidden_states=True)
    hidden = {layer: out.hidden_states[layer][0] for layer in exit_layers}
    return hidden, out.logits[0]


def exit_logits(model, hidden):
    """FREE's shallow head without an adapter: the final norm and the LM head."""
    return model.lm_head(model.model.norm(hidden))


def distill(logits, top_ids, top_probs):
    """Cross-entropy of ``logits`` [S, V] against the teacher's top-k distribution, renormalized."""
    target = top_probs.float()
    target = target / target.sum(-1, keepdim=True)
    log_probs = logits.float().log_softmax(-1).gather(1, top_ids)
    return -(target * log_probs).sum(-1).mean()


def evaluate(model, records: Sequence[dict], layers: Sequence[int], exit_layer: int) -> dict:
    """On held-out answers (teacher-forced): per layer the share of positions where the
    exit head's argmax equals the deep head's (exit agreement), and the share where the
    deep argmax equals the original model's (deep fidelity: 1.0 before training)."""
    import torch

    agree = {layer: 0 for layer in layers}
    fidelity = positions = 0
    with torch.no_grad():
        for record in records:
            hidden, deep = answer_forward(model, record, sorted(set(layers) | {exit_layer}))
            deep_top = deep.argmax(-1)
            fidelity += int((deep_top == record["top_ids"][:, 0]).sum())
            positions += len(deep_top)
            for layer in layers:
                agree[layer] += int((exit_logits(model, hidden[layer]).argmax(-1) == deep_top).sum())
    return {
        "positions": positions,
        "exit_agreement": {str(layer): round(agree[layer] / max(positions, 1), 4) for layer in layers},
        "deep_fidelity": round(fidelity / max(positions, 1), 4),
    }


# ---- training ----------------------------------------------------------------------------


def _trainable(model, config: TrainConfig):
    """Mark what learns (see the module docstring); returns (parameters, LoRA wrappers)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.lora_rank:
        wrapped = add_lora(model, config.exit_layer, config.lora_rank)
        params = [p for _, _, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
    else:
        wrapped = []
        params = [*model.model.layers.parameters(), *model.model.norm.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params, wrapped


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(generator, prompts: Sequence[Sequence[int]], config: TrainConfig, out: Path,
          progress: bool = True, report_layers: Sequence[int] | None = None) -> TrainReport:
    """Fine-tune ``generator``'s model for FREE at ``config.exit_layer`` on its own answers
    to ``prompts`` (chat-templated ids); resume from ``out/train/checkpoint.pt`` when it
    holds a run of the same setting; write the model folder into ``out``."""
    import torch
    from tqdm import tqdm

    model, tokenizer = generator.model, generator.tokenizer
    depth = len(model.model.layers)
    if not 0 < config.exit_layer < depth:
        raise ValueError(f"--exit-layer must be between 1 and {depth - 1} for this {depth}-layer model, got {config.exit_layer}")
    if config.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {config.steps}")
    if config.lora_rank is not None and config.lora_rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {config.lora_rank}")
    if not 0.0 <= config.shallow_weight <= 1.0:
        raise ValueError(f"the shallow weight is a share of the loss, between 0 and 1; got {config.shallow_weight}")
    out = Path(out).expanduser()
    if (out / FREE_META).exists():
        raise FileExistsError(f"{out} already holds a trained model ({FREE_META}): choose another --out or remove it")
    state_dir = out / "train"
    state_dir.mkdir(parents=True, exist_ok=True)
    teacher_file, checkpoint_file = state_dir / "teacher.pt", state_dir / "checkpoint.pt"
    layers = sorted(set(report_layers or range(1, depth)) | {config.exit_layer})

    # 1. the teacher: once, kept for a resumed run
    started = time.perf_counter()
    teacher = torch.load(teacher_file, weights_only=False) if teacher_file.exists() else None
    if teacher is not None and teacher.get("key") != config.key():
        raise ValueError(f"{teacher_file} was written for another setting: use another --out, or remove {state_dir} to start over")
    if teacher is None:
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(generator.eos_token_ids)
        records = teacher_answers(model, prompts, generator.eos_token_ids, pad, config, progress)
        heldout = [r for i, r in enumerate(records) if i % config.heldout_every == 0][: config.heldout_sequences]
        train_records = [r for i, r in enumerate(records) if i % config.heldout_every != 0]
        if not train_records or not heldout:
            raise ValueError(f"{len(records)} answered prompts are too few to train and hold out every {config.heldout_every}th: give more prompts")
        before = evaluate(model, heldout, layers, config.exit_layer)
        teacher = {"key": config.key(), "train": train_records, "heldout": heldout, "before": before,
                   "seconds": time.perf_counter() - started}
        with atomic_path(teacher_file) as tmp:
            torch.save(teacher, tmp)
    train_records, heldout = teacher["train"], teacher["heldout"]

    # 2. what learns, and where a resumed run stands
    params, wrapped = _trainable(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    step, curve, seconds = 0, [], teacher["seconds"]
    if checkpoint_file.exists():
        state = torch.load(checkpoint_file, weights_only=False)
        if state["key"] != config.key():
            raise ValueError(f"{checkpoint_file} was written for another setting: use another --out, or remove {state_dir} to start over")
        named = dict(_named_trainable(model))
        for name, tensor in state["weights"].items():
            with torch.no_grad():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, curve, seconds = state["step"], state["curve"], state["seconds"]
        random.setstate(state["python_rng"])
    else:
        random.seed(config.seed)
        curve.append({"step": 0, "loss": None, **_point(teacher["before"], config.exit_layer)})

    # 3. the steps
    model.train()
    run_started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=f"free train (exit layer {config.exit_layer})", disable=not progress)
    bar.set_postfix(agree=f"{curve[-1]['exit_agreement']:.1%}", fidelity=f"{curve[-1]['deep_fidelity']:.1%}")
    losses: list[float] = []
    while step < config.steps:
        optimizer.zero_grad()
        total = 0.0
        for record in random.sample(train_records, min(config.sequences_per_step, len(train_records))):
            hidden, deep = answer_forward(model, record, [config.exit_layer])
            shallow = exit_logits(model, hidden[config.exit_layer])
            loss = (config.shallow_weight * distill(shallow, record["top_ids"], record["top_probs"])
                    + (1 - config.shallow_weight) * distill(deep, record["top_ids"], record["top_probs"]))
            (loss / config.sequences_per_step).backward()
            total += loss.item() / config.sequences_per_step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(total)
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            point = _point(evaluate(model, heldout, [config.exit_layer], config.exit_layer), config.exit_layer)
            model.train()
            curve.append({"step": step, "loss": round(sum(losses) / len(losses), 4), **point})
            losses = []
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", agree=f"{curve[-1]['exit_agreement']:.1%}", fidelity=f"{curve[-1]['deep_fidelity']:.1%}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            elapsed = seconds + time.perf_counter() - run_started
            state = {"key": config.key(), "step": step, "curve": curve, "seconds": elapsed,
                     "weights": {name: p.detach().clone() for name, p in _named_trainable(model)},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "python_rng": random.getstate()}
            with atomic_path(checkpoint_file) as tmp:
                torch.save(state, tmp)
    bar.close()
    seconds += time.perf_counter() - run_started

    # 4. the model folder
    model.eval()
    merge_lora(wrapped)
    for p in model.parameters():
        p.requires_grad_(False)
    after = evaluate(model, heldout, layers, config.exit_layer)
    report = TrainReport(
        model=generator.name, out=str(out), exit_layer=config.exit_layer, steps=step,
        trainable_parameters=sum(p.numel() for p in params), train_answers=len(train_records),
        heldout_answers=len(heldout), train_positions=sum(len(r["answer"]) for r in train_records),
        seconds=round(seconds, 1), teacher_seconds=round(teacher["seconds"], 1), curve=curve,
        agreement_by_layer_before=teacher["before"]["exit_agreement"], agreement_by_layer_after=after["exit_agreement"],
    )
    save_model_folder(model, tokenizer, out, {"base_model": generator.name, "config": asdict(config), **report.as_dict(),
                                              "deep_fidelity_after": after["deep_fidelity"]})
    return report


def _named_trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _point(evaluation: dict, exit_layer: int) -> dict:
    return {"exit_agreement": evaluation["exit_agreement"][str(exit_layer)], "deep_fidelity": evaluation["deep_fidelity"]}


def save_model_folder(model, tokenizer, out: Path, meta: dict) -> None:
    """Write the weights, config and tokenizer into ``out`` (each file renamed into place
    with ``durable_rename``), then ``FREE_META``: a folder holding that file is complete."""
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    for path in sorted(partial.iterdir()):
        if path.is_file():
            path.chmod(0o644)  # save_pretrained's files can be 0600
            durable_rename(path, out / path.name)
    shutil.rmtree(partial, ignore_errors=True)
    write_json(meta, out / FREE_META)
