"""The GPU probes' Triton kernels, run on Triton's CPU interpreter (each probe's `--cpu-check`):
- benchmarks/flat_attention_probe.py: its flat stream-K decode kernels (plain loads and TMA
  descriptors) equal the reference attention, also when an item's key tiles are cut between two
  programs and merged from two partials;
- benchmarks/sm_read_probe.py: its streaming kernel sums each program's slice as torch does, so
  the GB/s it reports count bytes really read."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _cpu_check(script: str, timeout_s: int) -> dict:
    """The JSON a probe's `--cpu-check` prints, run with TRITON_INTERPRET=1 from the repo root."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, script, "--cpu-check"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flat_kernels_match_the_reference_on_the_interpreter():
    errs = _cpu_check("benchmarks/flat_attention_probe.py", 300)
    assert set(errs) == {f"{kind}/p{p}" for kind in ("plain", "tma") for p in (1, 3, 5, 12)}
    assert max(errs.values()) < 1e-5, errs


def test_stream_sum_matches_torch_on_the_interpreter():
    assert _cpu_check("benchmarks/sm_read_probe.py", 120)["max_abs_err"] < 1e-4


def test_the_sm_hold_kernel_compiles_for_hopper_and_reads_the_sm_id_and_timer(monkeypatch, tmp_path):
    """benchmarks/confined_attention_probe.py's hold kernel uses inline PTX, which Triton's
    interpreter cannot run: compile it for sm_90 here (no GPU needed) and check what it reads."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from benchmarks import confined_attention_probe as probe

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    src = triton.compiler.ASTSource(probe._hold_kernel, {"done_ptr": "*i32", "free_below": "i32",
                                                          "hold_ns": "i32"}, constexprs={})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": probe.HOLD_WARPS}).asm["ptx"]
    assert "%smid" in ptx and "%globaltimer" in ptx and "atom" in ptx
