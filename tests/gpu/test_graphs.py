"""CUDA-graph behaviour on a real GPU (skipped without CUDA).

For every captured bucket: graph replay gives the same tokens as the same step run eagerly (float32),
and logits within bf16 tolerance (bfloat16); greedy tokens equal HF generate on the GPU; buffer
addresses are unchanged after capture and after serving; no capture happens after startup.
"""
from __future__ import annotations

import asyncio
from unittest import mock

import pytest
import torch

from engine_helpers import collect, run
from replica import Engine, EngineConfig
from replica.graphs import CaptureClosedError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BUCKETS = (1, 2, 4, 8, 16)


def _engine(path, dtype, mode="thread"):
    """mode "thread" keeps the runtime in this process so tests can reach its buffers."""
    return Engine(EngineConfig(model=path, device="cuda", dtype=dtype, batch_buckets=BUCKETS,
                               max_seq_len=256, max_num_seqs=16, kv_cache_bytes=64 << 20,
                               engine_process=mode))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, tiny_llama_dir):
    eng = _engine(tiny_llama_dir[0], request.param)
    yield eng
    eng.shutdown()


def _prefilled_rows(rt, b, gen):
    """Prefill b random prompts into fresh slots; rows as DecodeGraphs.run expects them."""
    rows, slots = [], []
    for i in range(b):
        prompt = torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        slot = rt.slots.allocate()
        slots.append(slot)
        logits = rt.prefill([(prompt, 0, slot)])[0]
        rows.append((int(logits.argmax()), len(prompt), slot, 0, 1000 + i, 1, 0.0, 1.0, -1))
    return rows, slots


def _replay_vs_eager(rt, b, mode, gen):
    rows, slots = _prefilled_rows(rt, b, gen)
    if mode == "sample":
        rows = [r[:3] + (20, r[4], r[5], 0.9, 0.95, -1) for r in rows]
    g = rt.graphs
    with torch.inference_mode():
        step = g.launch(rows, sampling=(mode == "sample"))
        g.collect(step)
        res = step.result
        replay = (g.out_tokens[:b].clone(), g.logits[:b].float().clone())
        g._step(b, mode)  # same static inputs, no graph; rewrites the same KV entries
        torch.cuda.synchronize()
        eager = (g.out_tokens[:b].clone(), g.logits[:b].float().clone())
    for s in slots:
        rt.slots.release(s)
    return res, replay, eager


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_replay_matches_eager_for_every_bucket(engine, bucket, mode):
    rt = engine.runtime
    assert rt.graphs.captured_buckets == BUCKETS
    gen = torch.Generator().manual_seed(bucket)
    res, (tok_g, log_g), (tok_e, log_e) = _replay_vs_eager(rt, bucket, mode, gen)
    assert res.path == "graph" and res.bucket == bucket
    if engine.runtime.dtype == torch.float32:
        assert torch.equal(tok_g, tok_e)
        torch.testing.assert_close(log_g, log_e, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(log_g, log_e, rtol=1.6e-2, atol=1e-2)  # bf16 tolerance
        assert (tok_g == tok_e).float().mean() >= 0.9


def test_bf16_logits_track_float32_reference(tiny_llama_dir):
    """The bf16 graph's logits stay within bf16 tolerance of the float32 eager computation."""
    outs = {}
    for dtype in ("float32", "bfloat16"):
        eng = _engine(tiny_llama_dir[0], dtype)
        try:
            _, (tok, logits), _ = _replay_vs_eager(eng.runtime, 8, "greedy", torch.Generator().manual_seed(7))
            outs[dtype] = logits
        finally:
            eng.shutdown()
    ref, got = outs["float32"], outs["bfloat16"]
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2e-2, f"relative error {rel:.3e}"


def test_greedy_tokens_match_hf_generate_on_gpu(tiny_llama_dir):
    path, hf_cpu = tiny_llama_dir
    hf = hf_cpu.to("cuda")
    eng = _engine(path, "float32", mode="process")   # the server's configuration
    prompts = [[5, 17, 99], list(range(40, 80)), [7], list(range(100, 113))]
    try:
        async def all_at_once():
            return await asyncio.gather(*[collect(eng, ids=p, max_tokens=10, temperature=0.0, ignore_eos=True)
                                          for p in prompts])
        results = run(all_at_once())
        for p, (toks, _, _) in zip(prompts, results):
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert toks == ref
        steps = eng.stats().decode_steps
        assert steps and all(path == "graph" for _, path in steps), steps
    finally:
        eng.shutdown()
        hf.to("cpu")


def test_addresses_stable_and_no_capture_after_startup(engine):
    rt = engine.runtime
    before = rt.kv.addresses() + rt.graphs.input_addresses()
    with mock.patch.object(torch.cuda.CUDAGraph, "capture_begin", autospec=True,
                           side_effect=AssertionError("capture after startup")) as begin:
        async def traffic():
            return await asyncio.gather(*[collect(engine, ids=[i + 1] * (i + 2), max_tokens=12,
                                                  temperature=0.8 * (i % 2), seed=i) for i in range(12)])
        results = run(traffic())
        assert all(len(t) == 12 for t, _, _ in results)
        assert begin.call_count == 0
    assert rt.kv.addresses() + rt.graphs.input_addresses() == before
    with pytest.raises(CaptureClosedError):
        rt.graphs.capture_all()
    assert rt.startup.capture_seconds > 0 and rt.startup.graph_bytes >= 0
