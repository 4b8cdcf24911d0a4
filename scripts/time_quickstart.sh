#!/usr/bin/env bash
# Time the quick start as a new user meets it: clone this checkout's HEAD into a new directory,
# create a new venv, run scripts/quickstart.sh there, and send the README's /rerank request every
# half second until it answers. Prints the seconds to the first answer, then waits for the
# service's background title vectors (/ready) and checks that the same request is then answered
# with the same results. Stops the service it started.
#   bash scripts/time_quickstart.sh [WORKDIR]   (default /tmp/instructrec-quickstart-timing; port 8020)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/instructrec-quickstart-timing}
PORT=${INSTRUCTREC_PORT:-8020}
rm -rf "$WORK"
mkdir -p "$WORK"
BODY='{"instruction": "a horror game for PlayStation 4",
  "history": ["Silent Hill HD Collection - Playstation 3", "Resident Evil 4 - PlayStation 2",
              "Dead Space (PlayStation 3)", "Bloodborne"],
  "candidates": ["Alien: Isolation - PlayStation 4", "Rock Band 4 Wireless Guitar Bundle - PlayStation 4",
                 "Fallout 4 - PlayStation 4", "Halo 3 - Xbox 360",
                 "Star Wars: Battlefront - Standard Edition - PlayStation 4", "Resident Evil 4 - PC"],
  "top_n": 3}'
# The same request with its keys in another order: not the first answer replayed whole from the
# cache, but ranked again (the LM's scores from the score cache, the signals and the gate anew).
AGAIN=$(python3 -c 'import json, sys; print(json.dumps(dict(reversed(list(json.loads(sys.argv[1]).items())))))' "$BODY")
rerank() { curl -s -o "$1" -w '%{http_code}' "localhost:$PORT/rerank" -H 'content-type: application/json' -d "${2:-$BODY}" || true; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$T0" "$(date +%s.%N)"; }

T0=$(date +%s.%N)
python3 -m venv "$WORK/venv"
git clone -q "$SRC" "$WORK/clone"
cd "$WORK/clone"
PATH="$WORK/venv/bin:$PATH" INSTRUCTREC_PORT=$PORT setsid bash scripts/quickstart.sh > "$WORK/quickstart.log" 2>&1 &
QS=$!
trap 'kill -- -$QS 2>/dev/null || true' EXIT
until [ "$(rerank "$WORK/first.json")" = 200 ]; do
  kill -0 $QS 2>/dev/null || { echo "the quick start stopped; see $WORK/quickstart.log" >&2; exit 1; }
  sleep 0.5
done
echo "first /rerank answer: $(since) s after the clone started (log: $WORK/quickstart.log)"
while curl -s "localhost:$PORT/ready" | grep -q '"title_vectors"'; do sleep 1; done
echo "title vectors computed: $(since) s"
rerank "$WORK/again.json" "$AGAIN" > /dev/null
python3 - "$WORK/first.json" "$WORK/again.json" <<'PY'
import json, sys
first, again = ([{k: v for k, v in r.items() if k != "cached"} for r in json.load(open(p))["results"]] for p in sys.argv[1:])
print("the same answer after them:", first == again)
sys.exit(0 if first == again else 1)
PY
