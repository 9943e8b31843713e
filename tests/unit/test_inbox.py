"""replica/inbox.py: a step's packed events reach each request's consumer in order, merged when
the consumer lags, woken once per step, with a failure delivered after the tokens before it."""
from __future__ import annotations

import asyncio
import threading

from replica.inbox import Inbox, deliver, fail
from replica.sampling_params import TokenLogprob
from replica.sequence import Event, StepEvents


def _lp(t):
    return (TokenLogprob(t, -0.5),)


def test_a_lagging_consumer_gets_everything_waiting_as_one_event():
    async def go():
        loop = asyncio.get_running_loop()
        r, s, u = Inbox("r", loop), Inbox("s", loop), Inbox("u", loop)
        boxes = {"r": r, "s": s, "u": u}
        deliver(StepEvents(["r", "s", "gone"], [1, 7, 5]), boxes)   # "gone": no inbox, dropped
        deliver(StepEvents(["r"], [2]), boxes)
        deliver(StepEvents(other=[Event("r", (3,), logprobs=_lp(3)), Event("u", (4,), "length", logprobs=_lp(4))]),
                boxes)
        deliver(StepEvents(other=[Event("r", (4,), "stop", True, cached_tokens=16)]), boxes)
        deliver(StepEvents(["r"], [9]), boxes)                 # after the finish: not merged
        boom = RuntimeError("engine died")
        fail(boom, [s])
        return await r.next(), len(r.items), await s.next(), await s.next(), await u.next()
    merged, left, first, after, single = asyncio.run(go())
    assert merged == Event("r", (1, 2, 3, 4), "stop", True, _lp(3), 16) and left == 1
    assert first == Event("s", (7,)) and isinstance(after, RuntimeError)
    assert single == Event("u", (4,), "length", False, _lp(4))


def test_a_waiting_consumer_is_woken_from_another_thread_once_per_step():
    async def go():
        loop = asyncio.get_running_loop()
        box = Inbox("r", loop)
        got = []

        async def consume():
            while True:
                e = await box.next()
                got.append(e.token_ids)
                if e.finish_reason:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert box.waiter is not None                      # parked, nothing lost while waiting

        def steps():
            for t in range(5):
                deliver(StepEvents(["r"], [t]), {"r": box})
            deliver(StepEvents(other=[Event("r", (5,), "length")]), {"r": box})
        threading.Thread(target=steps).start()
        await asyncio.wait_for(task, 5)
        return got
    got = asyncio.run(go())
    assert [t for chunk in got for t in chunk] == [0, 1, 2, 3, 4, 5]
