#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp, the CPU peer of `paratree bench`) from its sdist into .venv.
# Optional and slow: ~7-10 min on 2 cores; pip caches the built wheel, so a rerun takes seconds.
#
# Build flags: never -march=native. On the Intel AMX VMs a native build dies with "Illegal
# instruction" as soon as a Q4_1 prompt of more than one token runs through its AMX path, so AMX is
# always off; the SIMD level is picked from this CPU's flags instead:
#   avx512f + avx512_vnni (+ avx512_bf16, avx512_vbmi)  -> AVX-512 build
#   avx2 + fma + f16c                                  -> AVX2 build
# Usage: bash scripts/build_llama_cpp.sh [version]   (default: the version pinned below)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.3.36}"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON"
args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
has avx && args+=" -DGGML_AVX=ON"
has avx2 && args+=" -DGGML_AVX2=ON"
has fma && args+=" -DGGML_FMA=ON"
has f16c && args+=" -DGGML_F16C=ON"
has bmi2 && args+=" -DGGML_BMI2=ON"
has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
if has avx512f; then
  args+=" -DGGML_AVX512=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
fi
echo "llama-cpp-python==$version with CMAKE_ARGS=$args"
. .venv/bin/activate
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python -m pip install --no-binary llama-cpp-python "llama-cpp-python==$version"
python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
