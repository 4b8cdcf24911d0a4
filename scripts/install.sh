#!/usr/bin/env bash
# Install instructrec and its dependencies into the current Python.
# torch is installed first, pinned, so that no dependency can pull a multi-GB CUDA build;
# on a GPU machine install the CUDA build of torch 2.13.0 yourself before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[service,lora,bench,eval,test]"
