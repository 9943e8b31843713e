"""Start-up shortcuts on a real GPU (skipped without CUDA): they must not change what is built.

Warm-up and the activation probe run only the first layers (`LlamaModel.first_layers`), and the
mixed-step warm-up only pieces 0, 1 and L. On a model deeper than that, capturing the layers that
were never warmed must compile nothing (a Triton compile inside a capture would fail the build),
the graphs must give HF generate's tokens, and the probe must find the whole stack's peak.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from engine_helpers import assert_greedy_matches_hf, assert_steps_replayed_graphs
from replica import Engine, EngineConfig
from replica.graphs import WARMUP_LAYERS
from replica.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_layers_never_warmed_capture_and_match_hf_generate(tmp_path):
    from hf_fixtures import save_tiny_llama

    layers = WARMUP_LAYERS + 3
    hf = save_tiny_llama(tmp_path, seed=5, num_hidden_layers=layers).to("cuda")
    eng = Engine(EngineConfig(model=str(tmp_path), device="cuda", dtype="float32", batch_buckets=(1, 2, 4, 8),
                              max_seq_len=256, block_size=16, max_num_seqs=8, kv_cache_bytes=32 << 20,
                              engine_process="thread"))
    prompts = [[3 + i] * (5 + 7 * i) for i in range(6)]
    try:
        assert len(eng.core.runner.model.layers) == layers
        assert eng.core.runner.mixed.graphs, "mixed-step graphs were captured"
        assert_greedy_matches_hf(eng, hf, prompts, max_tokens=16)
        assert_steps_replayed_graphs(eng)
    finally:
        eng.shutdown()


def test_probe_over_two_layers_finds_the_whole_stacks_peak():
    """llama-1b's 16 layers, one built runner: its activation probe (a full-mode decode step at the
    sized width and a mixed forward of the step budget) peaks at the same bytes over two layers as
    over all of them. (Two engines in one process would not compare: the second sizes from what
    the first left reserved, so it probes another width.)"""
    eng = Engine(EngineConfig(model="random:llama-1b", device="cuda", dtype="bfloat16", max_seq_len=2048,
                              memory_utilization=0.3, use_cuda_graphs=False, engine_process="thread"))
    r = eng.core.runner
    width, kept = r.out.tokens.shape[0], (r.decode, r.kv)    # the probe swaps in its own step
    try:
        with torch.inference_mode():
            short = r._probe_activation(width)
            r.decode, r.kv = kept
            with mock.patch.object(LlamaModel, "first_layers", lambda self, n: contextlib.nullcontext(self)):
                whole = r._probe_activation(width)
    finally:
        r.decode, r.kv = kept
        eng.shutdown()
    assert whole > 256 << 20, whole          # the budget's activations, not noise
    assert abs(short - whole) <= 0.01 * whole, (short, whole)


COMPILE_AHEAD_SCRIPT = r'''
import json, os, sys
from pathlib import Path
from triton import knobs
from replica import Engine, EngineConfig, sizing

compiles = []          # (kernel, compiled as a warm-up) per Triton compile, in order
knobs.runtime.jit_cache_hook = lambda **kw: compiles.append((kw["fn"].name, kw["is_manual_warmup"]))
marks, measure_peak = {}, sizing.measure_peak

def launchers():            # C launchers built so far (Triton caches one per kernel signature)
    return len(list(Path(os.environ["TRITON_CACHE_DIR"]).rglob("__triton_launcher*")))

def measured(run, device):  # the probe's real run, right after its compile-ahead pass
    marks["probe_start"], marks["launchers_start"] = len(compiles), launchers()
    try:
        return measure_peak(run, device)
    finally:
        marks["probe_end"], marks["launchers_end"] = len(compiles), launchers()

sizing.measure_peak = measured
eng = Engine(EngineConfig(model=sys.argv[1], device="cuda", dtype="bfloat16", batch_buckets=(1, 2, 4, 8),
                          max_seq_len=256, block_size=16, max_num_seqs=8, kv_cache_bytes=32 << 20,
                          engine_process="thread"))
seconds = eng.stats().startup.compile_seconds
eng.shutdown()
print(json.dumps({"compiles": compiles, "seconds": seconds, **marks}))
'''


def test_compile_ahead_leaves_the_probe_nothing_to_compile(tmp_path):
    """In a fresh process with an empty Triton cache, the start-up probe's kernels are all
    compiled by the compile-ahead pass (as warm-ups, on its thread pool), with their C launchers,
    and the probe's real launches right after it compile nothing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hf_fixtures import save_tiny_llama

    save_tiny_llama(tmp_path / "model", seed=3)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", COMPILE_AHEAD_SCRIPT, str(tmp_path / "model")],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    ahead = rec["compiles"][:rec["probe_start"]]
    assert len(ahead) >= 5 and all(warm for _, warm in ahead), ahead   # norms, silu, rope, attention
    assert rec["compiles"][rec["probe_start"]:rec["probe_end"]] == [], rec
    assert rec["launchers_start"] >= 5 and rec["launchers_end"] == rec["launchers_start"], rec
    assert rec["seconds"] > 0
