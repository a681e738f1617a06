#!/usr/bin/env bash
# The committed decoding benchmarks (bench/results/*.json): LLMA against hf-greedy and
# hf-prompt-lookup on every workload, 30 prompts each, 128 new tokens at most.
# About an hour on 2 cores; run it with nothing else on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGDEC=${RAGDEC:-.venv/bin/ragdec}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
LIMIT=${LIMIT:-30}
# hf-prompt-lookup's best setting here (a sweep on rag: drafts of 2 after up to 3-gram
# matches beat transformers' default of 10 and 2 on a CPU, where long drafts cost more)
PL_BEST=hf-prompt-lookup:prompt_lookup_num_tokens=2:max_matching_ngram_size=3
run() {  # workload methods
  "$RAGDEC" bench "$1" --model "$MODEL" --methods "$2" --limit "$LIMIT" --max-new-tokens 128 \
    --json "bench/results/llma_$1.json"
}
run rag "hf-greedy,llma,$PL_BEST,hf-prompt-lookup,llma:variants=false"
run chat "hf-greedy,llma,$PL_BEST"
run cag "hf-greedy,llma,$PL_BEST,llma:variants=false"
run rag-forced "forced,llma-forced"
run summarize "hf-greedy,llma,$PL_BEST"
run specbench "hf-greedy,llma,$PL_BEST"
