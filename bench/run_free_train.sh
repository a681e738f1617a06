#!/usr/bin/env bash
# FREE on a model trained for it (bench/results/free_trained_<model>_<workload>.json):
# `ragdec free train` fine-tunes the model with the shallow-deep objective at EXIT_LAYER on
# its own answers to calibration prompts (past the benchmarks' own), the exit adapter of
# `ragdec free calibrate` is trained on the original at the same layer, then each workload
# runs in one process: the original's hf-greedy (the reference), free and free-lossless
# on the original with its adapter, and greedy, free and free-lossless on the trained
# model (model=DIR), float32. Training takes about 45 minutes on 2 cores for smollm2
# (a resumed run goes on from its checkpoint), the benchmarks about 20; run it alone.
# qwen2.5-coder-0.5b as in the README (34 minutes of training, about 22 of calibration and benchmarks):
#   MODEL=qwen2.5-coder-0.5b-instruct EXIT_LAYER=17 LORA_RANK=16 STEPS=150 PROMPTS=20 SHALLOW_WEIGHT=0.3
set -euo pipefail
cd "$(dirname "$0")/.."
RAGDEC=${RAGDEC:-.venv/bin/ragdec}
MODEL=${MODEL:-smollm2-135m-instruct}
EXIT_LAYER=${EXIT_LAYER:-10}
STEPS=${STEPS:-400}
TOKENS=${TOKENS:-64}
LIMIT=${LIMIT:-8}
PROMPTS=${PROMPTS:-60}  # calibration prompts per workload answered for training
LORA_RANK=${LORA_RANK:-}  # set: a LoRA of this rank on the first EXIT_LAYER layers instead of every weight
SHALLOW_WEIGHT=${SHALLOW_WEIGHT:-0.5}
if [ -n "$LORA_RANK" ]; then LR=${LR:-1e-3}; else LR=${LR:-2e-4}; fi
OUT=${OUT:-${RAGDEC_HOME:-$HOME/.cache/ragdec}/trained/$MODEL-free$EXIT_LAYER}
home=${RAGDEC_HOME:-$HOME/.cache/ragdec}
if [ ! -f "$OUT/ragdec_free.json" ]; then
  "$RAGDEC" free train --model "$MODEL" --exit-layer "$EXIT_LAYER" --steps "$STEPS" --lr "$LR" \
    ${LORA_RANK:+--lora-rank "$LORA_RANK"} --shallow-weight "$SHALLOW_WEIGHT" \
    --prompts "$PROMPTS" --max-prompt-tokens 320 --out "$OUT" --json "bench/results/free_train_$MODEL.json"
fi
if [ ! -f "$home/free/$MODEL/layer$EXIT_LAYER.safetensors" ]; then
  # the adapter of today, on the same answers the training saw
  "$RAGDEC" free calibrate --model "$MODEL" --exit-layer "$EXIT_LAYER" --prompts "$PROMPTS" --max-prompt-tokens 320 --json "bench/results/free_calibration_${MODEL}_layer$EXIT_LAYER.json"
fi
for workload in xsum squad specbench-qa-translation; do
  "$RAGDEC" bench "$workload" --model "$MODEL" --exit-layer "$EXIT_LAYER" --limit "$LIMIT" --max-new-tokens "$TOKENS" \
    --methods "hf-greedy,free,free-lossless,greedy:model=$OUT,free:model=$OUT,free-lossless:model=$OUT" \
    --json "bench/results/free_trained_${MODEL}_$workload.json"
done
