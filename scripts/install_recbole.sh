#!/usr/bin/env bash
# Install RecBole 1.2.1 (the SASRec / BERT4Rec baselines) into its own virtual environment.
#
# RecBole 1.2.1 cannot share the main environment: it uses np.float_ (numpy < 2) and
# needs pandas 2.2 / scipy 1.13. The baselines run as a subprocess of the main
# environment (instructrec/training/baselines/recbole.py), with this environment's python.
#
#   bash scripts/install_recbole.sh            # -> artifacts/envs/recbole
#   INSTRUCTREC_RECBOLE_ENV=/some/dir bash scripts/install_recbole.sh
#
# torch 2.13.0 goes in first, pinned (the CPU build on this machine's disk; any other spec
# could pull a multi-GB CUDA build; on a GPU machine install the CUDA build of torch 2.13.0
# into the venv yourself first). Everything else is installed with --no-deps from the
# pinned list below, so nothing can re-resolve torch. The list is the minimal set that
# RecBole's dataset, trainer and sequential models need to import and train; RecBole's
# declared extras for hyper-parameter search and its quick-start (ray, thop, plotly,
# tabulate, psutil, hyperopt) are left out on purpose: the runner does not use them.
# Idempotent: does nothing when the environment already imports the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=${INSTRUCTREC_RECBOLE_ENV:-artifacts/envs/recbole}
PY=${PYTHON:-python3}
start=$(date +%s)

PINS=(
  recbole==1.2.1
  numpy==1.26.4
  pandas==2.2.3 python-dateutil==2.9.0.post0 pytz==2024.2 tzdata==2024.2 six==1.16.0
  scipy==1.13.1
  scikit-learn==1.5.2 joblib==1.4.2 threadpoolctl==3.5.0   # recbole.evaluator imports sklearn.metrics
  pyyaml==6.0.2 tqdm==4.67.1 colorlog==4.7.2 colorama==0.4.4 texttable==1.7.0
  tensorboard==2.18.0 protobuf==5.28.3 absl-py==2.1.0      # recbole.utils imports torch.utils.tensorboard
)

CHECK='
import sys
import numpy, pandas, scipy, torch, recbole
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec, BERT4Rec
from recbole.utils import get_trainer
want = {"recbole": "1.2.1", "numpy": "1.26.4", "pandas": "2.2.3", "scipy": "1.13.1", "torch": "2.13.0"}
have = {"recbole": recbole.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__,
        "scipy": scipy.__version__, "torch": torch.__version__.split("+")[0]}
bad = {k: have[k] for k in want if have[k] != want[k]}
if bad:
    sys.exit(f"unexpected versions: {bad}")
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
'

pip_quiet() {
  # pip 23 warns about every missing directory of a file:// extra index: keep the rest.
  "$ENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ -x "$ENV_DIR/bin/python" ] && "$ENV_DIR/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  echo "RecBole environment already installed at $ENV_DIR: $("$ENV_DIR/bin/python" -c "$CHECK")"
  exit 0
fi

echo "== creating the RecBole environment at $ENV_DIR"
"$PY" -m venv "$ENV_DIR"
if ! "$ENV_DIR/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "== torch 2.13.0"
  pip_quiet "torch==2.13.0"
fi
echo "== recbole 1.2.1 and its pinned dependencies (--no-deps: torch stays as installed)"
pip_quiet --no-deps "${PINS[@]}"

"$ENV_DIR/bin/python" -c "$CHECK"
echo "RecBole environment ready at $ENV_DIR in $(( $(date +%s) - start )) s"
