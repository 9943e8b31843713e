#!/usr/bin/env bash
# One device-machine session for the engine (issue 2): GPU tests, kernel micro-benchmarks, and the
# decode benchmark, all logs and JSON under $OUT. Usage on the GPU host, from the repo root:
#   bash benchmarks/gpu_session.sh [engine_decode.py args...]
set -uo pipefail
OUT=${OUT:-/tmp/graphserve-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L | tee "$OUT/card.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/card.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  timeout 120 python3 benchmarks/kernels_bench.py 2>&1 | tee "$OUT/kernels.log" | tail -30
fi
python3 benchmarks/engine_decode.py --out "$OUT/engine_decode.json" "$@" 2>&1 | tee "$OUT/engine_decode.log" | tail -40
