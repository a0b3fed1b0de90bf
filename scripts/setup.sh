#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with this project installed (editable) and its dev tools.
# Where no NVIDIA GPU is visible, the CPU build of torch is installed first, so nothing pulls a CUDA build.
# sglang is never installed here: it is the optional `.[gpu]` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
rm -f "$VENV"/.setup-*
touch "$stamp"
