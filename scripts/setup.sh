#!/usr/bin/env bash
# Create .venv and install the project without ever pulling CUDA wheels on a CPU machine.
#
# If the environment already has a torch (a CUDA build on a GPU machine, say), it is kept:
# pyproject.toml only asks for torch>=2.4. Otherwise torch is installed first, so that the
# project's range is already satisfied and no dependency pulls a build of its own:
#   - with an NVIDIA GPU (nvidia-smi present): TORCH_SPEC, default torch==2.13.0 (CUDA build);
#   - without one: the CPU build, torch==2.13.0+cpu, from wherever pip finds it (a local
#     wheel or a configured index), else from TORCH_CPU_INDEX (PyTorch's CPU wheel index).
# A "+cpu" pin can never resolve to the multi-GB CUDA wheels.
#
# The installs go through scripts/install.sh: uv where it can be had (the same versions as pip,
# in 70 s instead of 136 s on 2 cores), else pip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
INSTALL=(scripts/install.sh "$VENV")

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "installing ${TORCH_SPEC:-torch==2.13.0} (GPU machine)"
    "${INSTALL[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  else
    echo "installing ${TORCH_SPEC:-torch==2.13.0+cpu} (CPU build)"
    "${INSTALL[@]}" "${TORCH_SPEC:-torch==2.13.0+cpu}" ||
      "${INSTALL[@]}" --index-url "$TORCH_CPU_INDEX" "${TORCH_SPEC:-torch==2.13.0+cpu}"
  fi
fi
stamp="$VENV/.fedtune-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing fedtune and its dependencies into $VENV"
  "${INSTALL[@]}" -e ".[dev]"
  touch "$stamp"
fi
