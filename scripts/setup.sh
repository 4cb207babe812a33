#!/usr/bin/env bash
# Installs edgedeploy and everything its tests need, on a fresh machine, at the exact versions the suite was run
# with (requirements/lock.txt, a pip constraints file; pyproject.toml keeps ranges). Idempotent: re-running is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
# torch/torchvision are pinned to the builds this project is tested with; skip when a usable pair is present.
if ! $PY -c "import torch, torchvision" >/dev/null 2>&1; then
  $PY -m pip install -q -c "$LOCK" "torch==2.14.1" "torchvision==0.29.1"
fi
$PY -m pip install -q -c "$LOCK" -e ".[rtx,test]"
$PY -c "import edgedeploy, torch; print(f'edgedeploy {edgedeploy.__version__} ready (torch {torch.__version__})')"
