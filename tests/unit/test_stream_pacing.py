"""Stream pacing (deployments/stream_pacing.py) and the paced `BatchRunner.run`: fewer Ray items,
the same tokens, and a sequence's first and last chunks never held."""
from __future__ import annotations

import asyncio
import time

import pytest

from deployments import stream_pacing
from deployments.batch_runner import BatchRunner
from deployments.protocol import PromptBatch, StreamChunk
from deployments.stream_pacing import interval_s, merge_chunks
from replica.sampling_params import SamplingParams, TokenLogprob
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import HANG, FakeEngine


def batch(*prompts, max_tokens=3, logprobs=None) -> PromptBatch:
    return PromptBatch(tuple(prompts), SamplingParams(max_tokens=max_tokens, logprobs=logprobs), n=1,
                       request_id="b")


async def consume(stream) -> tuple[list[list[StreamChunk]], list[float]]:
    items, times = [], []
    async for chunks in stream:
        items.append(chunks)
        times.append(time.perf_counter())
    return items, times


def tokens_by_sequence(items) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for chunks in items:
        for c in chunks:
            out.setdefault(c.index, []).extend(c.token_ids)
    return out


def test_interval_is_streams_over_the_item_budget_capped():
    assert interval_s(1, 0.0) == 0.0               # pacing off
    assert interval_s(0, 500.0) == 0.0
    assert interval_s(1, 500.0) == pytest.approx(0.002)
    assert interval_s(50, 500.0) == pytest.approx(0.1)
    assert interval_s(10_000, 500.0) == stream_pacing.MAX_INTERVAL_S


def test_merge_keeps_one_chunk_per_sequence_in_first_seen_order():
    lp = lambda t: (TokenLogprob(t, -0.5, ()),)  # noqa: E731
    chunks = [StreamChunk(1, 1, "a", (97,), None, 4, 1, lp(97), 2),
              StreamChunk(0, 0, "x", (120,), None, 5, 1, None, 0),
              StreamChunk(1, 1, "b", (98,), "length", 4, 2, lp(98), 3)]
    merged = merge_chunks(chunks)
    assert [c.index for c in merged] == [1, 0]
    assert merged[0] == StreamChunk(1, 1, "ab", (97, 98), "length", 4, 2, lp(97) + lp(98), 3)
    assert merged[1] is chunks[1]
    assert merge_chunks([]) == []


def test_a_paced_stream_sends_two_items_first_token_and_the_rest(monkeypatch):
    """One sequence of 30 tokens under a 10 s interval: its first token goes at once, the rest is
    held until the last chunk wakes the stream - two items, the same tokens, no 10 s wait."""
    monkeypatch.setattr(stream_pacing, "MAX_INTERVAL_S", 10.0)
    engine = FakeEngine(step_s=0.002)
    runner = BatchRunner(engine, stream_items_per_s=0.1)          # 1 stream: 10 s interval

    async def main():
        t0 = time.perf_counter()
        items, times = await consume(runner.run(batch("p", max_tokens=30), paced=True))
        return t0, items, times

    t0, items, times = asyncio.run(main())
    assert len(items) == 2
    assert [len(c.token_ids) for chunks in items for c in chunks] == [1, 29]
    assert tokens_by_sequence(items)[0] == [ord("a") + i for i in range(26)] + [ord("a") + i for i in range(4)]
    assert items[-1][-1].finish_reason == "length" and items[-1][-1].completion_tokens == 30
    assert times[0] - t0 < 2.0 and times[-1] - t0 < 5.0            # neither end waited 10 s
    assert runner.paced_streams == 0


def test_pacing_off_or_unpaced_runs_send_one_item_per_chunk():
    async def main(runner, paced):
        items, _ = await consume(runner.run(batch("p", max_tokens=20), paced=paced))
        return items

    for runner, paced in ((BatchRunner(FakeEngine(step_s=0.001), stream_items_per_s=0.0), True),
                          (BatchRunner(FakeEngine(step_s=0.001), stream_items_per_s=0.1), False)):
        items = asyncio.run(main(runner, paced))
        assert len(items) == 20
        assert runner.paced_streams == 0


def test_paced_batches_deliver_every_token_and_first_tokens_early(monkeypatch):
    """Four concurrent 3-sequence streams, paced at 10 s: every sequence gets all its tokens,
    each sequence's first token arrives long before the interval, and collect() is unaffected."""
    monkeypatch.setattr(stream_pacing, "MAX_INTERVAL_S", 10.0)
    engine = FakeEngine(step_s=0.001)
    runner = BatchRunner(engine, stream_items_per_s=0.1)

    async def one():
        t0 = time.perf_counter()
        first_at: dict[int, float] = {}
        got: dict[int, list[int]] = {}
        async for chunks in runner.run(batch("a", "b", "c", max_tokens=12), paced=True):
            assert runner.paced_streams >= 1
            for c in chunks:
                first_at.setdefault(c.index, time.perf_counter() - t0)
                got.setdefault(c.index, []).extend(c.token_ids)
        return first_at, got

    async def main():
        return await asyncio.gather(*(one() for _ in range(4)))

    t0 = time.perf_counter()
    for first_at, got in asyncio.run(main()):
        assert sorted(got) == [0, 1, 2]
        assert all(ids == [ord("a") + i for i in range(12)] for ids in got.values())
        assert max(first_at.values()) < 2.0
    assert time.perf_counter() - t0 < 5.0
    assert runner.paced_streams == 0
    res = asyncio.run(runner.collect(batch("a", max_tokens=5)))
    assert res.completions[0].token_ids == tuple(ord("a") + i for i in range(5))


def test_closing_a_held_stream_aborts_its_sequences_and_releases_the_count(monkeypatch):
    monkeypatch.setattr(stream_pacing, "MAX_INTERVAL_S", 10.0)
    engine = FakeEngine(step_s=0.001)
    runner = BatchRunner(engine, stream_items_per_s=0.1)

    async def main():
        stream = runner.run(batch((1, 2), (1, HANG), max_tokens=50), paced=True)
        first = await stream.__anext__()               # the first tokens go at once
        assert runner.paced_streams == 1
        await stream.aclose()                          # the consumer leaves while the rest is held
        await asyncio.sleep(0.01)
        return first

    first = asyncio.run(main())
    assert first and first[0].token_ids
    assert runner.paced_streams == 0 and runner.admitted == 0
    assert sorted(engine.aborted) == ["b-0", "b-1"]


def test_merged_chunks_keep_one_logprob_per_token_on_the_wire():
    """A paced item merges a sequence's chunks; the SSE formatter must still emit one logprob
    entry per token (completions: tokens/token_logprobs; chat: content), and usage counts all."""
    import json

    from deployments.http_stream import chat_events, completion_events
    from deployments.openai_format import TokenText
    from replica.tokenizer import ByteTokenizer

    lp = lambda t: (TokenLogprob(t, -0.5, ((t + 1, -1.0),)),)  # noqa: E731
    parts = [StreamChunk(0, 0, chr(97 + i), (97 + i,), "length" if i == 3 else None, 2, i + 1, lp(97 + i), 0)
             for i in range(4)]
    first, merged = merge_chunks(parts[:1]), merge_chunks(parts[1:])
    assert len(merged) == 1 and merged[0].token_ids == (98, 99, 100)

    async def rest():
        yield merged

    async def body(events):
        return [json.loads(e[len("data: "):]) for e in [x async for x in events(first, rest())]
                if e.startswith("data: {")]

    tt = TokenText(ByteTokenizer())
    comp = asyncio.run(body(completion_events("r", "m", True, tt)))
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in comp if e["choices"]) == 4
    assert "".join(e["choices"][0]["text"] for e in comp if e["choices"]) == "abcd"
    assert comp[-1]["usage"]["completion_tokens"] == 4
    chat = asyncio.run(body(chat_events("r", "m", True, tt)))
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in chat
               if e["choices"] and e["choices"][0]["logprobs"]) == 4
    assert chat[-1]["usage"]["completion_tokens"] == 4
