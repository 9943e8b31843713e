"""benchmarks/step_profile.py (CPU): the kernel-gap arithmetic it reports the GPU's idle time
with, its kernel classes, and the host-phase timing it wraps around a real engine's steps."""
from __future__ import annotations

from benchmarks import step_profile as sp
from replica import EngineConfig, SamplingParams
from replica.sequence import Sequence
from replica.worker import EngineCore


def test_gaps_count_only_time_no_kernel_covers():
    kernels = [[0, 10, "a"], [5, 20, "b"], [50, 60, "c"], [55, 58, "d"], [100, 130, "e"]]
    g = sp.kernel_gaps(kernels)
    assert g["idle_ms"] == (30 + 40) / 1e3                # 20..50 and 60..100; overlaps are busy
    assert g["span_ms"] == 130 / 1e3
    assert [(x["us"], x["after"], x["before"]) for x in g["largest"]] == [(40, "c", "e"), (30, "b", "c")]


def test_kernel_kinds():
    assert sp.kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert sp.kernel_kind("_decode_split_kernel") == "attention"
    assert sp.kernel_kind("_prefill_kernel") == "attention"
    assert sp.kernel_kind("_rope_store_kv_kernel") == "elementwise"
    assert sp.kernel_kind("some_new_kernel") == "other"


def test_timed_steps_times_each_phase_and_restores_the_methods():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=128,
                                   batch_buckets=(1, 2, 4), engine_process="thread"))
    for i in range(3):
        core.scheduler.submit(Sequence(f"r{i}", list(range(5, 25)), SamplingParams(max_tokens=8, ignore_eos=True), i))
    rec = sp.timed_steps(core, 4, "cpu")
    assert set(rec["host_ms_per_step"]) == {"schedule", "launch", "collect", "postprocess"}
    assert rec["mixed_steps"] >= 1 and rec["wall_ms_per_step"] >= rec["host_ms_per_step"]["launch"]
    assert "launch" not in vars(core.runner) and "schedule" not in vars(core.scheduler)
    while core.has_work():
        core.step()                                        # the engine still runs to the end
    assert core.scheduler.counters["generated_tokens"] == 3 * 8
