"""`Inbox`: one request's events on their way from the worker's thread to the request's asyncio
loop; `deliver` hands a step's events (`StepEvents`) to every inbox.

The worker's thread appends to a deque (safe across threads): a token id for the common one-token
event, the `Event` itself for the rest, an exception when the engine fails. It wakes a consumer
only if that consumer is waiting, with one `call_soon_threadsafe` per loop per step. The consumer
(`next`) drains everything waiting into one event, so one that lags gets its tokens in fewer,
larger chunks instead of falling further behind (a chunk costs the same front-end work however
many tokens it carries).

Per token this is a dict lookup and a deque append on the worker's thread; per request and step at
most one future is set. (An `asyncio.Queue` per request, fed one `Event` per token, was the
engine's front-end limit on small models: ~90k tokens/s at 500 rows on a dev CPU, below what the
GPU steps produce.)
"""
from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from typing import Optional, Union

from replica.sequence import Event, StepEvents

Item = Union[int, Event, BaseException]
_PLAIN = Event("", ())           # what a bare token id stands for: running, no stop, no logprobs


class Inbox:
    __slots__ = ("request_id", "loop", "items", "waiter")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self.loop = request_id, loop
        self.items: deque[Item] = deque()
        self.waiter: Optional[asyncio.Future] = None    # set while `next` waits

    async def next(self) -> Union[Event, BaseException]:
        """Everything waiting as one event (an exception alone, after the tokens before it)."""
        items = self.items
        while not items:
            self.waiter = self.loop.create_future()
            if not items:        # an append between the test above and the future: no wake-up
                await self.waiter
            self.waiter = None
        return _merge(self.request_id, items)


def _merge(request_id: str, items: deque) -> Union[Event, BaseException]:
    first = items.popleft()
    if isinstance(first, BaseException):
        return first
    event = Event(request_id, (first,)) if type(first) is int else first
    if not items or event.finish_reason is not None:
        return event
    toks, lps, with_lps = list(event.token_ids), list(event.logprobs or ()), event.logprobs is not None
    cached, last = event.cached_tokens, event
    while items and last.finish_reason is None:
        nxt = items[0]
        if isinstance(nxt, BaseException):
            break                # reported by the next call, after these tokens
        items.popleft()
        if type(nxt) is int:
            toks.append(nxt)
            last = _PLAIN
            continue
        toks += nxt.token_ids
        lps += nxt.logprobs or ()
        with_lps |= nxt.logprobs is not None
        cached, last = max(cached, nxt.cached_tokens), nxt
    return Event(request_id, tuple(toks), last.finish_reason, last.stopped_on_token,
                 tuple(lps) if with_lps else None, cached)


def deliver(events: StepEvents, inboxes: dict[str, Inbox]) -> None:
    """The worker's thread: append each event to its request's inbox (events of requests no longer
    there - aborted, or ended by a stop string - are dropped) and wake the waiting consumers."""
    woken: dict = defaultdict(list)
    get = inboxes.get
    for rid, tok in zip(events.ids, events.tokens):
        box = get(rid)
        if box is not None:
            box.items.append(tok)
            if box.waiter is not None:
                woken[box.loop].append(box)
    for e in events.other:
        box = get(e.request_id)
        if box is not None:
            box.items.append(e)
            if box.waiter is not None:
                woken[box.loop].append(box)
    for loop, boxes in woken.items():
        call_soon(loop, _wake, boxes)


def fail(error: BaseException, inboxes: list[Inbox]) -> None:
    """Give every inbox `error` (after what it already holds) and wake its consumer."""
    woken: dict = defaultdict(list)
    for box in inboxes:
        box.items.append(error)
        woken[box.loop].append(box)
    for loop, boxes in woken.items():
        call_soon(loop, _wake, boxes)


def _wake(boxes: list[Inbox]) -> None:
    for box in boxes:
        w = box.waiter
        if w is not None and not w.done():
            w.set_result(None)


def call_soon(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening
        pass
