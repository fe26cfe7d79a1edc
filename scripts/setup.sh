#!/usr/bin/env bash
# Create .venv and install ultraflux into it.
#   CPU machine (no GPU visible to nvidia-smi): pins the CPU torch wheel torch==2.13.0.
#   GPU machine: installs a CUDA torch (torch>=2.4) from the registry.
#   TORCH_SPEC=... overrides the torch requirement; ULTRAFLUX_EXTRAS=dev,scale picks extras (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-"torch>=2.4"}
else
  TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}
fi
pip_install() {  # pip, without the noise of this machine's optional local index folders
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2)
}
# torch first, so that no later resolution can pull a different (CUDA) build on a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || pip_install "$TORCH_SPEC"
pip_install -e ".[${ULTRAFLUX_EXTRAS:-dev}]"
.venv/bin/python -c "import ultraflux, torch; print('ultraflux', ultraflux.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
