"""benchmarks/mixed_step_probe.py (CPU, tiny model): the step it times is a full mixed forward of
the engine's model (one logit row per decode row and per prompt chunk, finite, repeatable), and a
run records every shape it was asked for."""
from __future__ import annotations

import json

import torch

from benchmarks import mixed_step_probe as mp
from replica import EngineConfig
from replica.worker import EngineCore


def test_the_probe_runs_the_engines_mixed_forward():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=256,
                                   batch_buckets=(1, 2, 4), engine_process="thread"))
    with torch.inference_mode():
        inputs = mp.mixed_inputs(core, prompt=20, decode_rows=3)
        logits = mp.launch(core, inputs)
        again = mp.launch(core, inputs)
    assert logits.shape == (4, core.runner.vocab_size)      # 3 decode rows + the prompt's last row
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, again)              # same inputs, same KV writes: same step


def test_a_cpu_run_records_each_shape(tmp_path):
    out = tmp_path / "probe.json"
    mp.main(["--models", "tiny", "--device", "cpu", "--shapes", "8:0,16:2", "--reps", "2",
             "--profile-calls", "1", "--out", str(out)])
    (rec,) = json.loads(out.read_text())["results"]
    assert [(s["prompt_tokens"], s["decode_rows"]) for s in rec["shapes"]] == [(8, 0), (16, 2)]
    assert all(s["host_ms"] > 0 and s["wall_ms"] >= s["host_ms"] for s in rec["shapes"])
    assert rec["host_profile"] and rec["host_profile"][0]["own_ms_per_step"] >= 0
