#!/usr/bin/env bash
# CMAKE_ARGS for building llama-cpp-python on this CPU (`make llamacpp`).
#
# llama.cpp's default native build compiles for -march=native, which on some virtual
# machines includes AMX: the CPU reports it, the hypervisor does not enable it, and the
# first AMX instruction (tilezero) dies with SIGILL. So: no native probing; each x86
# instruction set on only where /proc/cpuinfo lists it; AMX always off.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# cpuinfo flag -> ggml option
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512vbmi:AVX512_VBMI \
            avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    flag=${pair%%:*}
    option=${pair##*:}
    if [[ "$flags" == *" $flag "* ]]; then args+=" -DGGML_$option=ON"; else args+=" -DGGML_$option=OFF"; fi
done
echo "$args"
