"""benchmarks/flat_attention_probe.py: its flat stream-K decode kernels (plain loads and TMA
descriptors) equal the reference attention on Triton's CPU interpreter, also when an item's key
tiles are cut between two programs and merged from two partials."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_flat_kernels_match_the_reference_on_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "benchmarks/flat_attention_probe.py", "--cpu-check"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errs) == {f"{kind}/p{p}" for kind in ("plain", "tma") for p in (1, 3, 5, 12)}
    assert max(errs.values()) < 1e-5, errs
