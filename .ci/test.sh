#!/usr/bin/env bash
# Set up a virtual environment and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # the CPU build on disk; a bare `torch` pulls a CUDA build
python -m pip install -q -e '.[test]'
python -m pytest -q tests "$@"
