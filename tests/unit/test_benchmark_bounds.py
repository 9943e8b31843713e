"""benchmarks/common.py's roofline and work floor, against the formulas written out by hand from
the model's shape (they are quoted in README and judge issue 8's bar)."""
from __future__ import annotations

import pytest

from benchmarks import roofline as RF

F, BW = 786e12, 4134e9          # an H200's measured GEMM rate and copy bandwidth (results/)


def _matmul_params(name: str) -> int:
    p = RF.PRESETS[name]
    h, i, nl = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    hd = p.get("head_dim") or h // p["num_attention_heads"]
    q, kv = p["num_attention_heads"] * hd, p["num_key_value_heads"] * hd
    return nl * (h * q + 2 * h * kv + q * h + 3 * h * i)


def test_work_floor_is_every_tokens_matmuls_prompt_attention_and_the_kv_decode_reads():
    name, reqs = "llama-8b", [(300, 200)] * 10 + [(100, 400)] * 10
    p = RF.PRESETS[name]
    P, O, n = 300 * 10 + 100 * 10, 200 * 10 + 400 * 10, 20
    lm_head = 2.0 * p["vocab_size"] * p["hidden_size"]
    matmul = (2.0 * _matmul_params(name) * (P + O) + lm_head * (n + O)) / F
    ctx = P / n + O / n / 2
    attention = O * ctx * RF.kv_bytes_per_token(name) / BW
    hd = p["hidden_size"] // p["num_attention_heads"]     # causal: a prompt's t-th token sees t keys
    per_layer = sum(4 * hd * p["num_attention_heads"] * t for q, _ in reqs for t in range(1, q + 1))
    prompt_attention = per_layer * p["num_hidden_layers"] / F
    got = RF.work_floor(name, reqs, F, BW)
    assert got["matmul_s"] == pytest.approx(matmul, rel=1e-12)
    assert got["prompt_attention_s"] == pytest.approx(prompt_attention, rel=1e-12)
    assert got["attention_s"] == pytest.approx(attention, rel=1e-12)
    assert got["floor_s"] == pytest.approx(matmul + prompt_attention + attention, rel=1e-12)


def test_the_roofline_undercounts_decode_at_many_rows_and_overcounts_it_at_one():
    burst = [(300, 300)] * 500                      # R = 500: decode steps are compute-bound
    roof = RF.roofline("llama-8b", burst, 10**7, F, BW)
    assert roof["rows"] == 500
    assert roof["t_roof_s"] / RF.work_floor("llama-8b", burst, F, BW)["floor_s"] < 0.8
    one = [(300, 300)]                              # R = 1: every step reads all weights
    assert RF.roofline("llama-8b", one, 10**7, F, BW)["t_roof_s"] > RF.work_floor("llama-8b", one, F, BW)["floor_s"]


def test_a_checkpoint_directory_has_the_bounds_of_its_config(tmp_path):
    """A layout given as a checkpoint (its config.json, as HF writes it) reads as the same numbers as
    the preset of that shape; a directory without a config names the presets."""
    import json

    fields = {k: v for k, v in RF.PRESETS["qwen2-7b"].items() if k != "model_type"}
    (tmp_path / "config.json").write_text(json.dumps({**fields, "model_type": "qwen2", "head_dim": None}))
    ckpt, reqs = str(tmp_path), [(300, 200)] * 40
    assert RF.known(ckpt) and not RF.known(str(tmp_path / "nothing"))
    assert RF.weight_bytes(ckpt, 64) == RF.weight_bytes("qwen2-7b", 64)
    assert RF.kv_bytes_per_token(ckpt) == RF.kv_bytes_per_token("qwen2-7b") == 28 * 2 * 4 * 128 * 2
    assert RF.roofline(ckpt, reqs, 10**6, F, BW) == RF.roofline("qwen2-7b", reqs, 10**6, F, BW)
    with pytest.raises(ValueError, match="llama-8b"):
        RF.layout(str(tmp_path / "nothing"))


def test_seconds_per_call_warms_up_then_times_calls_back_to_back(monkeypatch):
    """The rates' timing: warm-up calls first (at least `warmup_calls`, for at least `warmup_s`),
    then `reps` timings of `per_timing` calls, one sync per timing, reported per call."""
    calls, syncs, clock = [], [], [0.0]
    durations = iter([0.0] * 3 + [0.004, 0.002, 0.002, 0.002] * 3)   # warm-up calls cost nothing

    def op():
        calls.append(1)
        clock[0] += next(durations)
    monkeypatch.setattr(RF, "sync", syncs.append)
    monkeypatch.setattr(RF.time, "perf_counter", lambda: clock[0])
    seconds = RF.seconds_per_call(op, "cpu", reps=3, per_timing=4, warmup_s=0, warmup_calls=3)
    assert len(calls) == 3 + 3 * 4 and len(syncs) == 3 + 3
    assert seconds == pytest.approx(0.010 / 4)
