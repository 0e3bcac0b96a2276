#!/usr/bin/env bash
# The MONAI Label environment of the tests (idempotent): monailabel 0.8.5 pins numpy<2 and pulls
# torchvision, so it gets its own virtual environment beside the project's.
#   bash tests/monailabel_env.sh [VENV]   # default .venv-monailabel in the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-monailabel}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q torch torchvision
    elif [ "$(uname -m)" = "aarch64" ]; then
        "$PY" -m pip install -q torch==2.9.1 torchvision==0.24.1    # CPU builds
    else
        "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1   # a torchvision that matches its torch
    fi
fi
# pydicom-seg (a monailabel requirement) needs pydicom 2
"$PY" -c "import monailabel.interfaces.app, monai_dualssl, pytest" 2>/dev/null \
    || "$PY" -m pip install -q -e ".[label,test]" "pydicom>=2.4.4,<3"
