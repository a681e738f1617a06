#!/usr/bin/env bash
# BiLD's committed results (bench/results/bild_*.json, bild_sweep_xsum.{json,png}):
# qwen2.5-coder-1.5b-instruct (big) with qwen2.5-coder-0.5b-instruct (little, int8),
# float32, against the big model's hf-greedy and hf-assisted (the float little model as
# assistant, and the int8 one). About 45 minutes on 2 cores; run it with nothing else on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGDEC=${RAGDEC:-.venv/bin/ragdec}
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
LIMIT=${LIMIT:-12}
# xsum: 8 articles (long ones: a float32 prefill of 1,800 tokens on 1.5B takes a minute per method)
TOKENS=${TOKENS:-64}
if [ "${SWEEP:-1}" = 1 ]; then
  # the threshold sweep: fallback x rollback on 6 XSum articles
  methods=hf-greedy
  for f in 0.3 0.5 0.7; do
    for r in 1 2 3 5; do methods="$methods,bild:fallback_threshold=$f:rollback_threshold=$r"; done
    methods="$methods,bild-lossless:fallback_threshold=$f"
  done
  "$RAGDEC" bench xsum --model "$MODEL" --methods "$methods" --limit 6 --max-new-tokens "$TOKENS" \
    --json bench/results/bild_sweep_xsum.json
  "$PYTHON" -m ragdec.bench.sweep_plot bench/results/bild_sweep_xsum.json bench/results/bild_sweep_xsum.png
fi
# DTYPE=bfloat16: the same at bfloat16 (bild_bf16_*.json), where a verify of many tokens
# costs about one step, but a k-token verify rounds differently from 1-token decoding, so
# the lossless modes are not exact there (the JSON's identical_to_hf_greedy shows how far)
methods=hf-greedy,hf-assisted,hf-assisted:int8=1,bild,bild-lossless
prefix=bild
dtype_flag=()
if [ -n "${DTYPE:-}" ]; then
  methods=hf-greedy,hf-assisted,bild,bild-lossless
  prefix=bild_${DTYPE/bfloat16/bf16}
  dtype_flag=(--dtype "$DTYPE")
fi
for workload in xsum squad specbench-qa-translation; do
  limit=$LIMIT
  [ "$workload" = xsum ] && limit=${XSUM_LIMIT:-8}
  "$RAGDEC" bench "$workload" --model "$MODEL" --methods "$methods" "${dtype_flag[@]}" \
    --limit "$limit" --max-new-tokens "$TOKENS" --json "bench/results/${prefix}_$workload.json"
done
