#!/usr/bin/env bash
# FREE's committed results (bench/results/free_<model>_<workload>.json): free and
# free-lossless at the default exit layer (0.7 of the depth) with the calibrated adapter,
# against hf-greedy and transformers' assistant_early_exit at the same layer, float32.
# Calibrates first where no adapter is saved (on the model's own answers, at the layers
# listed, which the calibration report compares). About 20 minutes on 2 cores, plus 9
# (0.5B, five layers) and 16 (1.5B, four) for calibration where it runs; run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGDEC=${RAGDEC:-.venv/bin/ragdec}
TOKENS=${TOKENS:-64}
for model in ${MODELS:-qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct}; do
  case $model in
    qwen2.5-coder-0.5b-instruct) layer=17 layers=12,16,17,18,20 limit=${LIMIT:-12} ;;  # 24 layers
    qwen2.5-coder-1.5b-instruct) layer=22 layers=19,20,21,22 limit=${LIMIT:-6} ;;  # 28 layers
    *) echo "run_free.sh: no exit layer set for $model" >&2; exit 2 ;;
  esac
  home=${RAGDEC_HOME:-$HOME/.cache/ragdec}
  if [ ! -f "$home/free/$model/layer$layer.safetensors" ]; then
    "$RAGDEC" free calibrate --model "$model" --exit-layer "$layers" --json "bench/results/free_calibration_$model.json"
  fi
  for workload in xsum squad specbench-qa-translation; do
    n=$limit
    fit=()
    [ "$workload" = xsum ] && n=$(( limit < 8 ? limit : 8 ))  # long articles: see run_bild.sh
    # 1.5B: XSum articles of at most 400 prompt tokens (a float32 prefill of 1,800 takes a minute per method)
    [ "$workload" = xsum ] && [ "$model" = qwen2.5-coder-1.5b-instruct ] && fit=(--max-prompt-tokens 400)
    "$RAGDEC" bench "$workload" --model "$model" --exit-layer "$layer" "${fit[@]}" \
      --methods hf-greedy,hf-early-exit,free,free-lossless \
      --limit "$n" --max-new-tokens "$TOKENS" --json "bench/results/free_${model}_$workload.json"
  done
done
