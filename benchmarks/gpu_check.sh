#!/usr/bin/env bash
# The project's GPU check, in one command (about 5 minutes on one H100; the budget is 8):
#
#     bash benchmarks/gpu_check.sh            # or: make gpu-check
#
# 1. the test suite's CUDA tests (tests/test_cuda.py: every method under AMP bf16 and fp16, the kernels and
#    2:4 products, resume, no host syncs in ordinary steps under torch.cuda.set_sync_debug_mode);
# 2. benchmarks/bench_gpu.py: 100 AMP training steps of every method, 2:4 against dense bf16 on the DeiT-small
#    and ViT-base MLP shapes, a whole DeiT-small step with BAME-dagger 2:4, BAME's compiled masked step.
#
# Results go to $OUT (default results/gpu): the pytest log, bench_gpu.json and its table. Without a CUDA
# device it says so in one line and exits 0. Exit status: non-zero if a test or a benchmark part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine: nothing to check"
    exit 0
fi
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), '| torch', torch.__version__)" | tee "$OUT/device.txt"
status=0
timeout 240 "$PY" -m pytest -q -p no:randomly tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 330 "$PY" benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" 2>"$OUT/bench_gpu.log" | tee "$OUT/bench_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; tail -20 "$OUT/bench_gpu.log"; }
echo "gpu_check: done (status $status); results in $OUT"
exit "$status"
