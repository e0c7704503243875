#!/usr/bin/env bash
# The GPU check of the paper preset (issue 16), as one prepared script for a lent accelerator machine:
#   bash benchmarks/gpu_check.sh            # installs what it needs, runs bench_gpu.py, writes results/gpu.json
#   bash benchmarks/gpu_check.sh --cpu --preset tiny --steps 2 --batch 2 --out /tmp/gpu.json   # check it on CPU
# Extra arguments go to benchmarks/bench_gpu.py.
#
# Python: this checkout's .venv when it exists and its torch sees what is asked for (a GPU, or --cpu).
# Otherwise a venv at $GPU_VENV (default .venv-gpu) that reuses the machine's own torch (--system-site-packages:
# a CUDA build is gigabytes, so a GPU machine is expected to have one) and adds this project without its
# pinned CPU torch. Nothing is downloaded at run time except those packages, and only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && CPU=1; done
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

sees() {  # does this python's torch see what we need?
  "$1" - "$CPU" <<'PY' >/dev/null 2>&1
import sys, torch
sys.exit(0 if sys.argv[1] == "1" or torch.cuda.is_available() else 1)
PY
}

PY=""
if [ -x .venv/bin/python ] && sees .venv/bin/python && .venv/bin/python -c "import opacus, shared_model" 2>/dev/null; then
  PY=.venv/bin/python
else
  GPU_VENV=${GPU_VENV:-.venv-gpu}
  BASE=${PYTHON:-python3}
  if ! sees "$BASE"; then
    echo "gpu_check: $BASE has no torch that sees a GPU; install a CUDA build of torch for it (or set PYTHON)," \
         "or run with --cpu" >&2
    exit 2
  fi
  [ -x "$GPU_VENV/bin/python" ] || "$BASE" -m venv --system-site-packages "$GPU_VENV"
  PY="$GPU_VENV/bin/python"
  # The project itself, without its dependencies (they would pull the CPU torch pinned in pyproject.toml),
  # then what bench_gpu.py imports that the machine lacks.
  "$PY" -m pip install --quiet --no-deps -e . >/dev/null
  for pkg in opacus pydantic pyyaml numpy safetensors; do
    mod=$pkg; [ "$pkg" = pyyaml ] && mod=yaml
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install --quiet "$pkg"
  done
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
exec "$PY" benchmarks/bench_gpu.py "$@"
