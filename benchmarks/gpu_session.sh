#!/usr/bin/env bash
# One device-machine session for the engine: GPU tests, paged-kernel micro-benchmarks, and the
# capacity benchmark, all logs and JSON under $OUT, inside one 10-minute command. Usage on the GPU
# host, from the repo root (the pre-rewrite engine tree in .baseline/ gives the same-run batch-1
# comparison; `git archive 154da7e replica | tar -x -C .baseline` makes it):
#   bash benchmarks/gpu_session.sh [engine_capacity.py args...]
# SKIP_TESTS=1 / SKIP_KERNELS=1 / SKIP_CAPACITY=1 leave a part out; LIMIT_S (default 570) is the
# whole session's wall-clock budget: the capacity benchmark gets what the earlier parts left.
set -uo pipefail
OUT=${OUT:-/tmp/graphserve-out}; mkdir -p "$OUT"
LIMIT_S=${LIMIT_S:-570}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L | tee "$OUT/card.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/card.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -rA tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|ERROR|passed|failed" | tail -40
fi
if [ "${SKIP_KERNELS:-0}" != 1 ]; then   # writes $OUT/kernels.json
  timeout 90 python3 benchmarks/kernels_bench.py --paged-only 2>&1 | tee "$OUT/kernels.log" | tail -25
fi
if [ "${SKIP_CAPACITY:-0}" != 1 ]; then
  left=$((LIMIT_S - SECONDS))
  baseline=(); [ -d .baseline/replica ] && baseline=(--baseline-tree .baseline)
  timeout $((left + 20)) python3 benchmarks/engine_capacity.py --out "$OUT/engine_capacity.json" \
    --budget-s "$left" "${baseline[@]}" "$@" 2>&1 | tee "$OUT/engine_capacity.log" | grep -v " INFO " | tail -40
fi
