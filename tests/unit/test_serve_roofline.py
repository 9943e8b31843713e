"""benchmarks/serve_roofline.py: serve_load bursts against the roofline, from a result file."""
from __future__ import annotations

import pytest

from benchmarks import roofline as RF
from benchmarks import serve_roofline as SR

RATES = {"gemm_TFLOPs": 700.0, "copy_GBps": 4000.0}


def _phase(wall, tokens, cut=0, errors=0):
    return {"wall_s": wall, "tokens": tokens, "all": {"cut": cut, "errors": errors}}


def _result():
    work = {"sequences": 4, "prompt_tokens_first": 1000, "output_tokens": 400}
    replicas = [{"gpu_ids": ["0"], "total_blocks": 101}, {"gpu_ids": ["1"], "total_blocks": 101}]
    phases = {"mix/s0/burst": _phase(2.0, 400), "mix/s1/burst": _phase(6.0, 250, cut=3),
              "mix/s0/lo": _phase(5.0, 400), "chat/s0/burst": _phase(1.0, 400)}
    return {"app_args": {"model": "random:llama-8b", "block_size": 16}, "env": {"card": "X"},
            "workload": {k: work for k in phases},
            "routers": {"ours": {"replicas": replicas, "phases": phases}}}


def test_roofline_reads_only_the_count_and_the_sums():
    mixed = [(100, 10), (300, 30), (200, 50), (400, 10)]
    even = [(250, 25)] * 4
    F, BW = 700e12, 4000e9
    assert RF.roofline("llama-8b", mixed, 10_000, F, BW)["t_roof_s"] == pytest.approx(
        RF.roofline("llama-8b", even, 10_000, F, BW)["t_roof_s"])


def test_only_whole_mix_and_heavy_bursts_count_split_over_the_gpus():
    acc = SR.fractions(_result(), RATES)["mix"]["ours"]
    assert set(SR.fractions(_result(), RATES)) == {"mix"}          # chat and open loops left out
    assert acc["phases"] == 1 and acc["gpus"] == 2                  # the cut burst left out
    per_gpu = [(250, 100), (250, 100)]                              # 4 sequences, 1000 / 400 tokens, 2 GPUs
    want = RF.roofline("llama-8b", per_gpu, 100 * 16, 700e12, 4000e9)["t_roof_s"]
    assert acc["roofline_fraction"] == pytest.approx(want / 2.0)
    assert acc["tokens_per_s_per_gpu"] == pytest.approx(400 / 2.0 / 2)
