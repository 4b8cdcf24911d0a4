#!/usr/bin/env bash
# Quick start on the embedded default: install, train the `quick` preset once on the full Games
# data shipped in the repo (<= 15 minutes on 2 CPU cores; reused afterwards; resumes if
# interrupted), build the Games catalogue for it, then serve it on http://127.0.0.1:${INSTRUCTREC_PORT:-8000}
# (POST /rerank, and POST /recommend over the catalogue).
# Redis at 127.0.0.1:6379 is used as the score cache when it answers; otherwise the
# service runs uncached and says so in its log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ ! -f artifacts/quickstart/model/instructrec.json ]; then
  instructrec train --preset quick --out artifacts/quickstart
fi
# The Games catalogue for /recommend (the titles as this model tokenises them; seconds),
# rebuilt whenever the model is newer than it.
CAT=artifacts/quickstart/catalogue-games.npz
if [ ! -f "$CAT" ] || [ artifacts/quickstart/model/instructrec.json -nt "$CAT" ]; then
  instructrec catalogue build --data games --model artifacts/quickstart/model --out "$CAT"
fi
exec instructrec serve --model artifacts/quickstart/model --catalogue "$CAT" "$@"
