#!/usr/bin/env bash
# ragdec beside llama.cpp on the same CPU, same model (llama.cpp on the zoo's GGUF, ragdec
# on the float32 or bfloat16 weights dequantized from it), same chat-templated prompts:
# bench/results/llamacpp_*.json. Needs `make llamacpp`. About an hour on 2 cores; run it
# with nothing else on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGDEC=${RAGDEC:-.venv/bin/ragdec}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
LIMIT=${LIMIT:-20}
# 1. llama.cpp's prompt lookup: a small sweep on rag (its best is DEFAULT_LOOKUP in
#    bench/llamacpp.py; 10 and 2 are llama-cpp-python's own defaults; SWEEP=0 skips it)
[ "${SWEEP:-1}" = 1 ] && "$RAGDEC" bench rag --model "$MODEL" --limit "${SWEEP_LIMIT:-5}" --max-new-tokens 128 \
  --methods llamacpp-greedy,llamacpp-prompt-lookup:num_pred_tokens=2:max_ngram_size=3,llamacpp-prompt-lookup:num_pred_tokens=4:max_ngram_size=3,llamacpp-prompt-lookup:num_pred_tokens=10:max_ngram_size=2 \
  --json bench/results/llamacpp_lookup_sweep.json
# 2. rag and chat, llama.cpp first (the reference of every ratio), in each of ragdec's weight configurations
for dtype in ${DTYPES:-float32 bfloat16 int4}; do
  for workload in ${WORKLOADS:-rag chat}; do
    "$RAGDEC" bench "$workload" --model "$MODEL" --dtype "$dtype" --limit "$LIMIT" --max-new-tokens 128 \
      --methods llamacpp-greedy,llamacpp-prompt-lookup,greedy,llma \
      --json "bench/results/llamacpp_${workload}_${dtype}.json"
  done
done
