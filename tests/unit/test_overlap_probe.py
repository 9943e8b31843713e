"""benchmarks/overlap_probe.py (CPU, tiny shapes): its half-batch variants do the serial step's work,
row for row, and a run records every variant it was asked for."""
from __future__ import annotations

import json

import torch

from benchmarks import overlap_probe as op
from replica.presets import PRESETS


def test_halves_compute_what_the_serial_step_computes():
    torch.manual_seed(0)
    p = PRESETS["tiny"]
    layer = op.Layer(p, rows=6, ctx=40, block_size=16, device="cpu", dtype=torch.float32)
    x = torch.randn(6, p["hidden_size"])
    serial = op.serial(layer, x, layers=3)
    tol = dict(rtol=1e-4, atol=1e-5 * serial.abs().max().item())   # outputs are ~1e-6 in size
    torch.testing.assert_close(torch.cat(op.halves(layer, x, 3, None)), serial, **tol)
    torch.testing.assert_close(torch.cat(op.pipelined(layer, x, 3, None)), serial, **tol)


def test_a_cpu_run_records_each_variant(tmp_path):
    out = tmp_path / "probe.json"
    op.main(["--model", "tiny", "--device", "cpu", "--rows", "8", "--layers", "2", "--out", str(out)])
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["rows"] == 8
    assert set(rec["ms_per_layer"]) == {"serial/default", "halves/lt/carve0", "pipelined/lt/carve0"}
    assert all(v > 0 for v in rec["ms_per_layer"].values())
    assert rec["vs_serial"]["serial/default"] == 1.0
