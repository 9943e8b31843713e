"""Slots and requests: completion, cancellation, stop strings and errors free slots; after 1,000
mixed requests nothing is leaked; bad input raises a typed error and disturbs nothing in flight."""
from __future__ import annotations

import asyncio
import random

import pytest

from engine_helpers import collect, run
from replica import Engine, EngineConfig, GenerationRequest, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2, 4, 8),
                              max_num_seqs=8, max_seq_len=64, step_token_budget=16))
    yield eng
    eng.shutdown()


def _idle(engine):
    s = engine.stats()
    return s.running == 0 and s.queued == 0 and s.free_slots == s.max_num_seqs


async def _wait_idle(engine, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if _idle(engine):
            return True
        await asyncio.sleep(0.01)
    return False


def test_cancellation_frees_the_slot_at_once(engine):
    async def go():
        req = GenerationRequest(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=50, ignore_eos=True))
        agen = engine.generate(req)
        await agen.__anext__()
        assert engine.stats().running == 1
        await agen.aclose()                      # the consumer walks away
        return await _wait_idle(engine, timeout=2.0)
    assert run(go())
    assert engine.core.pool.leaked() == 0


def test_thousand_mixed_requests_leak_nothing(engine):
    rng = random.Random(0)
    before = engine.stats()

    async def one(i):
        kind = i % 4
        ids = [rng.randrange(0, 256) for _ in range(rng.randint(1, 30))]
        if kind == 0:    # run to max_tokens
            return await collect(engine, ids=ids, max_tokens=rng.randint(1, 6), ignore_eos=True)
        if kind == 1:    # cancelled after a few chunks
            agen = engine.generate(GenerationRequest(prompt_token_ids=ids,
                                                     params=SamplingParams(max_tokens=40, ignore_eos=True)))
            async for _ in agen:
                if rng.random() < 0.5:
                    break
            await agen.aclose()
            return None
        if kind == 2:    # a task cancelled from outside
            task = asyncio.ensure_future(collect(engine, ids=ids, max_tokens=40, ignore_eos=True))
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return None
        # stop string on whatever text the model produces, or EOS, or length
        return await collect(engine, ids=ids, max_tokens=8, stop=[chr(rng.randrange(32, 127))])

    async def go():
        for start in range(0, 1000, 50):  # 50 in flight at a time, more than the 8 slots
            await asyncio.gather(*[one(i) for i in range(start, start + 50)])
        return await _wait_idle(engine)
    assert run(go())
    after = engine.stats()
    done = (after.finished_requests + after.aborted_requests) - (before.finished_requests + before.aborted_requests)
    assert done == 1000
    assert engine.core.pool.leaked() == 0
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting


def test_stop_string_ends_the_text_before_the_match(engine):
    toks, text, reason = run(collect(engine, ids=[10, 20, 30], max_tokens=30, temperature=0.0, ignore_eos=True))
    assert len(text) > 6
    stop = text[4:6]
    first = text.find(stop)
    _, stopped, reason = run(collect(engine, ids=[10, 20, 30], max_tokens=30, temperature=0.0,
                                     ignore_eos=True, stop=[stop]))
    assert reason == "stop" and stopped == text[:first]
    assert run(_wait_idle(engine))


def test_bad_requests_raise_typed_errors_and_leave_others_running(engine):
    async def go():
        good = asyncio.ensure_future(collect(engine, ids=[1, 2], max_tokens=20, ignore_eos=True))
        await asyncio.sleep(0)
        errors = []
        for bad in (dict(ids=[1] * 64, max_tokens=1),        # longer than max_seq_len - 1
                    dict(ids=[10 ** 6], max_tokens=1)):       # outside the vocabulary
            try:
                await collect(engine, **bad)
            except InvalidRequestError as e:
                errors.append(str(e))
        return errors, await good
    errors, (toks, _, reason) = run(go())
    assert len(errors) == 2 and "maximum is 63" in errors[0] and "[0, 259)" in errors[1]
    assert len(toks) == 20 and reason == "length"
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_length_is_capped_by_max_seq_len(engine):
    toks, _, reason = run(collect(engine, ids=list(range(60)), max_tokens=50, ignore_eos=True))
    assert reason == "length" and len(toks) == 4   # 60 prompt + 4 new = max_seq_len 64


def test_health_and_shutdown_abort_in_flight_requests():
    eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2), max_seq_len=64))
    eng.check_health()

    async def go():
        agen = eng.generate(GenerationRequest(prompt_token_ids=[1], params=SamplingParams(max_tokens=60, ignore_eos=True)))
        await agen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        reasons = [c.finish_reason async for c in agen]
        return reasons
    assert run(go())[-1] == "abort"
    with pytest.raises(Exception, match="not running"):
        eng.check_health()


def test_chunks_count_completion_tokens_as_they_arrive(engine):
    async def go():
        req = GenerationRequest(prompt_token_ids=[3, 4], params=SamplingParams(max_tokens=6, ignore_eos=True))
        return [(len(c.token_ids), c.completion_tokens) async for c in engine.generate(req)]
    counts = run(go())
    running = 0
    for n, reported in counts:
        running += n
        assert reported == running
    assert running == 6


def test_engine_in_its_own_process_matches_the_thread_engine():
    """The process backend (the default on CUDA) gives the same tokens as the in-process one,
    reports stats across the boundary, and shuts down cleanly."""
    def tokens(mode):
        eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2, 4), max_seq_len=64,
                                  engine_process=mode))
        try:
            async def go():
                return await asyncio.gather(*[collect(eng, ids=[i + 1, 7], max_tokens=6, temperature=0.9,
                                                      seed=i, ignore_eos=True) for i in range(3)])
            out = [t for t, _, _ in run(go())]
            stats = eng.stats()
            eng.check_health()
            return out, stats
        finally:
            eng.shutdown()
    in_thread, _ = tokens("thread")
    in_process, stats = tokens("process")
    assert in_process == in_thread
    assert stats.generated_tokens == 18 and stats.free_slots == stats.max_num_seqs


def test_a_process_backend_front_end_never_imports_torch():
    """The serving replica's process only relays requests: torch stays in the engine process (its
    import is 3.5 s on an H200 host), and the auto backend choice is made without it."""
    import subprocess
    import sys
    code = ("import sys, asyncio\n"
            "from replica import Engine, EngineConfig, GenerationRequest, SamplingParams\n"
            "e = Engine(EngineConfig(model='random:tiny', device='cpu', engine_process='process', max_seq_len=64))\n"
            "async def go():\n"
            "    return [c async for c in e.generate(GenerationRequest(prompt_token_ids=[1, 2],"
            " params=SamplingParams(max_tokens=3, ignore_eos=True)))]\n"
            "chunks = asyncio.run(go())\n"
            "e.shutdown()\n"
            "assert sum(len(c.token_ids) for c in chunks) == 3, chunks\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_an_engine_process_that_fails_to_start_raises_its_error_in_the_caller():
    from replica import ConfigError

    with pytest.raises(ConfigError, match="KV budget"):
        Engine(EngineConfig(model="random:tiny", device="cpu", engine_process="process", max_seq_len=64,
                            kv_cache_bytes=1000))


def test_auto_backend_is_decided_from_the_device_and_the_driver_without_torch(monkeypatch):
    from replica.engine import _use_process

    def use(device="auto", mode="auto"):
        return _use_process(EngineConfig(model="random:tiny", device=device, engine_process=mode))
    assert use("cuda:1") and not use("cpu") and use("cpu", "process") and not use("cuda", "thread")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not use()                                     # every GPU hidden: in-process
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("os.path.exists", lambda p: p == "/dev/nvidiactl")
    assert use()                                         # a driver and visible GPUs: own process


def test_a_dead_engine_process_fails_its_requests_and_its_health_check():
    from replica.worker import EngineDeadError

    eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2), max_seq_len=64,
                              engine_process="process"))
    try:
        async def go():
            agen = eng.generate(GenerationRequest(prompt_token_ids=[1],
                                                  params=SamplingParams(max_tokens=60, ignore_eos=True)))
            await agen.__anext__()
            eng._backend._proc.kill()                 # the GPU process dies (OOM killer, driver reset)
            with pytest.raises(EngineDeadError):
                async for _ in agen:
                    pass
        run(go())
        with pytest.raises(EngineDeadError):
            eng.check_health()
        with pytest.raises(EngineDeadError):
            run(collect(eng, ids=[1], max_tokens=2))
    finally:
        eng.shutdown()


def test_prefill_rate_is_measured_on_steps_that_prefill_enough_tokens():
    """Short prompts beside decode rows measure the rows, not the prefill: the published rate (the
    router's `rate`) is left alone by them and set once MIN_SAMPLES steps prefilled >= 256 tokens
    each (replica/measured.py); decode step times likewise appear per bucket after MIN_SAMPLES."""
    from replica.measured import MIN_SAMPLES
    from replica.worker import MIN_RATE_PREFILL_TOKENS

    eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2, 4), max_seq_len=512,
                              step_token_budget=512, engine_process="thread"))
    try:
        run(collect(eng, ids=list(range(1, 40)), max_tokens=3, ignore_eos=True))
        assert eng.stats().mixed_steps > 0 and eng.stats().prefill_tokens_per_s == 0.0
        for k in range(MIN_SAMPLES):
            assert eng.stats().prefill_tokens_per_s == 0.0, k
            run(collect(eng, ids=[7 + k] * (MIN_RATE_PREFILL_TOKENS + 20), max_tokens=MIN_SAMPLES + 2,
                        ignore_eos=True))
        stats = eng.stats()
        assert stats.prefill_tokens_per_s > 0.0
        assert set(stats.decode_step_s) == {1} and stats.decode_step_s[1] > 0.0
    finally:
        eng.shutdown()

