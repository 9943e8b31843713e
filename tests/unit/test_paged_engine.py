"""Paged KV against HF transformers' own greedy `generate`: prefix-cache hits (cold and warm),
preemption and recompute, mixed prefill+decode steps, growth to max_seq_len, and a burst larger
than the pool; every block comes back afterwards."""
from __future__ import annotations

import asyncio
import random

from engine_helpers import collect, run
from replica import Engine, EngineConfig
from replica.model_runner import EAGER_MIXED_ROWS, eager_rows
from test_engine_vs_hf import hf_greedy


def _engine(path, **kw):
    base = dict(model=path, device="cpu", dtype="float32", max_seq_len=128, block_size=8,
                batch_buckets=(1, 2, 4, 8), step_token_budget=24)
    return Engine(EngineConfig(**{**base, **kw}))


def _idle(eng) -> None:
    core = eng.core
    assert not core.scheduler.running and not core.scheduler.waiting
    assert core.pool.leaked() == 0
    core.pool.check()


def _greedy_all(eng, prompts, n):
    async def go():
        return await asyncio.gather(*[collect(eng, ids=p, max_tokens=n, temperature=0.0, ignore_eos=True)
                                      for p in prompts])
    return [t for t, _, _ in run(go())]


def test_prefix_cache_hits_cold_and_warm_match_hf(tiny_llama_dir):
    path, hf = tiny_llama_dir
    eng = _engine(path)
    try:
        system = list(range(30, 70))                        # 40 shared tokens = 5 blocks of 8
        prompts = [system + [5, 6, 7], system + [9], system + list(range(200, 215))]
        cold = _greedy_all(eng, prompts[:1], 10)             # nothing cached yet
        s0 = eng.stats()
        warm = _greedy_all(eng, prompts, 10)                 # all three reuse the system blocks
        s1 = eng.stats()
        for p, toks in zip(prompts, warm):
            assert toks == hf_greedy(hf, p, 10)
        assert cold[0] == warm[0]
        hit = s1.prefix_hit_tokens - s0.prefix_hit_tokens
        assert hit >= 3 * 40, f"expected every prompt to reuse the 40-token prefix, hit {hit}"
        assert s0.prefix_hit_tokens == 0
        _idle(eng)
    finally:
        eng.shutdown()


def test_preemption_and_recompute_match_hf(tiny_llama_dir):
    path, hf = tiny_llama_dir
    # 20 usable blocks of 8 tokens: 4 sequences growing to 50 tokens need 28; preemption must happen.
    eng = _engine(path, kv_cache_bytes=21 * _block_bytes(), max_num_seqs=4, batch_buckets=(1, 2, 4),
                  enable_prefix_cache=False)
    try:
        prompts = [list(range(10 + 7 * i, 30 + 7 * i)) for i in range(4)]
        got = _greedy_all(eng, prompts, 30)
        for p, toks in zip(prompts, got):
            assert toks == hf_greedy(hf, p, 30)
        assert eng.stats().preemptions > 0
        _idle(eng)
    finally:
        eng.shutdown()


def test_mixed_steps_and_growth_to_max_seq_len_match_hf(tiny_llama_dir):
    path, hf = tiny_llama_dir
    eng = _engine(path, max_seq_len=64, step_token_budget=13)
    try:
        prompts = [list(range(1, 51)), [3, 1, 4, 1, 5], list(range(100, 131))]
        model, seen = eng.core.runner.model, []
        forward = model.forward_mixed

        def watched(tokens, positions, slots, meta, *rest):  # what the rope kernel gets pointers to
            seen.append((meta.num_tokens, tokens.numel(), positions.data_ptr() % 16, slots.data_ptr() % 16))
            return forward(tokens, positions, slots, meta, *rest)
        model.forward_mixed = watched
        got = _greedy_all(eng, prompts, 40)                  # the first reaches max_seq_len at 14 tokens
        # every mixed step's columns start 16-byte aligned, odd token counts included (Triton
        # compiles pointer alignment into a kernel: one variant, compiled at startup); the rows
        # the matmuls see are padded (cuBLAS: few shapes), to shapes the runner warms at startup
        assert any(n % 2 for n, _, _, _ in seen) and all(a == b == 0 for _, _, a, b in seen), seen
        assert all(rows % EAGER_MIXED_ROWS == 0 and n <= rows < n + EAGER_MIXED_ROWS for n, rows, _, _ in seen)
        warmed = {rows for name, _, _, rows in eng.core.runner.eager_gemms() if name == "w13"}
        assert {rows for _, rows, _, _ in seen} <= warmed
        assert any(rows > n for n, rows, _, _ in seen), "no step was padded"
        assert got[0] == hf_greedy(hf, prompts[0], 14)
        assert got[1] == hf_greedy(hf, prompts[1], 40) and got[2] == hf_greedy(hf, prompts[2], 33)
        s = eng.stats()
        assert s.mixed_steps > 0 and s.mixed_decode_rows > 0, "decode rows never ran inside a prefill step"
        assert sum(s.decode_steps.values()) > 0
        _idle(eng)
    finally:
        eng.shutdown()


def test_burst_larger_than_the_pool_matches_hf_and_returns_every_block(tiny_llama_dir):
    path, hf = tiny_llama_dir
    eng = _engine(path, kv_cache_bytes=33 * _block_bytes(), max_num_seqs=8)   # ~5 sequences of 50
    try:
        rng = random.Random(1)
        prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 40))] for _ in range(24)]
        got = _greedy_all(eng, prompts, 12)
        for p, toks in zip(prompts, got):
            assert toks == hf_greedy(hf, p, 12)
        _idle(eng)
    finally:
        eng.shutdown()


def test_churn_with_random_cancels_returns_every_block():
    eng = Engine(EngineConfig(model="random:tiny", device="cpu", max_seq_len=96, block_size=4,
                              max_num_seqs=8, batch_buckets=(1, 2, 4, 8), step_token_budget=20,
                              kv_cache_bytes=60 * 2 * 2 * 2 * 4 * 16 * 4))
    rng = random.Random(0)
    shared = [rng.randrange(256) for _ in range(12)]

    async def one():
        ids = (shared if rng.random() < 0.5 else []) + [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        task = asyncio.ensure_future(collect(eng, ids=ids, max_tokens=rng.randint(1, 30), ignore_eos=True))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def go():
        for _ in range(20):
            await asyncio.gather(*[one() for _ in range(50)])
        for _ in range(200):
            s = eng.stats()
            if s.running == 0 and s.queued == 0:
                return
            await asyncio.sleep(0.01)
    try:
        run(go())
        s = eng.stats()
        assert s.finished_requests + s.aborted_requests == 1000
        assert s.aborted_requests > 50 and s.preemptions > 0 and s.prefix_hit_tokens > 0
        _idle(eng)
        assert s.free_blocks == s.total_blocks - 1
    finally:
        eng.shutdown()


def _block_bytes(block_size: int = 8) -> int:
    # tiny checkpoint: 2 layers x 2 KV heads x 16 head_dim, fp32, K and V
    return 2 * 2 * 2 * block_size * 16 * 4
