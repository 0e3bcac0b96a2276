#!/usr/bin/env bash
# Set up a virtual environment (idempotent) and run the main job or the tests.
#   bash run.sh train   # install, then run the demo training (replacing an earlier demo run)
#   bash run.sh test    # install, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q torch             # CUDA build for GPU machines
    else
        "$PY" -m pip install -q torch==2.13.0     # CPU build
    fi
fi
EXTRAS=test
[ "${1:-test}" = test ] && EXTRAS=test,mlflow   # the tests cover --tracking mlflow (about 30 s to install)
"$PY" -m pip install -q -e ".[$EXTRAS]"
case "${1:-test}" in
    train) shift; exec "$PY" -m monai.bundle run training --config_file bundle/configs/train.yaml --overwrite True "$@" ;;
    test)  shift; exec "$PY" -m pytest -q tests "$@" ;;
    *) echo "usage: bash run.sh [train|test] [extra args]" >&2; exit 2 ;;
esac
