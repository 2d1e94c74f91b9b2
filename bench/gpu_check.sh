#!/usr/bin/env bash
# GPU acceptance run: bench/gpu_check.py (its docstring lists what it measures), one JSON
# (OUT/gpu_check.json) and a printed table, sized for at most 10 minutes on one H100 or H200.
# Without CUDA the same code runs on the CPU at tiny sizes (tests/test_gpu_check.py does).
#   bench/gpu_check.sh [--out DIR] [--compile on] [--sections pretrain,ddp,...] [--pairs N] ...
# GPU_CHECK_TIMEOUT (seconds, default 600) stops a run that would overrun the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" bench/gpu_check.py "$@"
