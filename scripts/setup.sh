#!/usr/bin/env bash
# Create .venv and install the project without ever pulling CUDA wheels on a CPU machine.
#
# If the environment already has a torch (for example a CUDA build on a GPU machine), it is
# kept: pyproject.toml only asks for torch>=2.4. Otherwise the CPU build is installed first
# (TORCH_SPEC, default torch==2.13.0; set TORCH_INDEX_URL to a CPU wheel index where your
# pip does not already find one), so the project's range is satisfied and nothing else pulls
# the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing $TORCH_SPEC (CPU build)"
  "${PIP[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
stamp="$VENV/.fedtune-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing fedtune and its dependencies into $VENV"
  "${PIP[@]}" install -e ".[dev]"
  touch "$stamp"
fi
