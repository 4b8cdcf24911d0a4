#!/usr/bin/env bash
# The test suite: real models (tiny, random), real HTTP on loopback, real Redis at 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec ${PYTHON:-python3} -m pytest -q "$@"
