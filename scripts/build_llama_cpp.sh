#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp, the CPU peer of `paratree bench`) from its sdist into .venv.
# Optional and slow: ~7-10 min on 2 cores; pip caches the built wheel, so a rerun takes seconds.
#
# Build flags: scripts/llama_cpp_flags.sh (AMX off, SIMD level from this CPU's flags).
# Usage: bash scripts/build_llama_cpp.sh [version]   (default: the version pinned below)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.3.36}"
. scripts/llama_cpp_flags.sh
args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
echo "llama-cpp-python==$version with CMAKE_ARGS=$args"
. .venv/bin/activate
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python -m pip install --no-binary llama-cpp-python "llama-cpp-python==$version"
python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
