"""benchmarks/engine_capacity.py `finish`: the summary and bars read the runs that exist."""
from __future__ import annotations

from types import SimpleNamespace

from benchmarks import engine_capacity as ec


def record(*fractions_by_len):
    return {"configs": [{"model": "llama-8b", "max_seq_len": msl, "startup": {},
                         "phases": {"burst": {"roofline_fraction": f}}}
                        for msl, f in fractions_by_len]}


def args(*seq_lens):
    return SimpleNamespace(models=["llama-8b"], device="cuda", seq_lens=list(seq_lens))


def test_the_long_context_bar_reads_the_longest_run():
    rec = ec.finish(record((8192, 0.57), (32768, 0.71)), args(8192, 32768))
    assert rec["summary"]["roofline_fraction"] == 0.57
    assert rec["summary"]["roofline_fraction_32k"] == 0.71
    assert rec["bars"]["burst_8192_roofline_ge_0.70"] is False
    assert rec["bars"]["burst_32768_roofline_ge_0.70"] is True


def test_one_context_length_leaves_the_long_context_bar_unmeasured():
    rec = ec.finish(record((8192, 0.57)), args(8192))
    assert rec["summary"]["roofline_fraction_32k"] is None
    assert rec["bars"]["burst_32768_roofline_ge_0.70"] is None
