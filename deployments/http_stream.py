"""Server-sent event streams of the OpenAI routes (`stream: true`).

Contract:
- `start_stream(chunks, events)` waits for the batch's first chunk list before answering, so a
  request the replica refuses, or that finds no replica, still gets its real status (400, 429,
  503) as a plain JSON error: it raises, and the route answers;
- after the 200 is sent, a failure becomes one error event (OpenAI's error object, classified by
  `deployments.errors.describe`: a dead replica is the fixed 503 message, never Ray internals),
  then `data: [DONE]`; every stream ends with `data: [DONE]`;
- when the client disconnects, Starlette cancels the response, which closes the replica stream and
  so aborts the batch's sequences in the engine;
- chunks carry logprobs in the endpoint's format when the request asked for them, and with
  `stream_options.include_usage` a last chunk carries `usage`.
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable, Optional

from fastapi.responses import StreamingResponse

from deployments import openai_format as fmt
from deployments.errors import describe
from deployments.protocol import StreamChunk, Usage

log = logging.getLogger("ray.serve")
Events = Callable[[list, AsyncIterator], AsyncIterator[str]]


async def start_stream(chunks: AsyncIterator[list[StreamChunk]], events: Events) -> StreamingResponse:
    it = chunks.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = []
    except BaseException:
        await _aclose(it)
        raise
    return StreamingResponse(_guarded(events(first, it), it), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _guarded(events: AsyncIterator[str], source) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
        err = describe(e)
        if err.status >= 500 and err.code == "internal_error":
            log.exception("graphserve: stream failed")
        else:
            log.warning("graphserve: stream ended by %d (%s): %s", err.status, err.code, err.message)
        yield fmt.sse(err.body)
    finally:
        await _aclose(source)
    yield fmt.sse("[DONE]")


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def _all(first: list[StreamChunk], rest) -> AsyncIterator[list[StreamChunk]]:
    yield first
    async for chunks in rest:
        yield chunks


class _UsageTally:
    def __init__(self):
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, c: StreamChunk) -> None:
        self.prompt[c.prompt_index] = c.prompt_tokens
        self.cached[c.prompt_index] = c.cached_tokens
        self.completion[c.index] = c.completion_tokens

    def usage(self) -> Usage:
        p, c = sum(self.prompt.values()), sum(self.completion.values())
        return Usage(p, c, p + c, sum(self.cached.values()))


def completion_events(rid: str, model: str, include_usage: bool,
                      tt: Optional[fmt.TokenText] = None) -> Events:
    async def events(first, rest) -> AsyncIterator[str]:
        created, tally, offsets = int(time.time()), _UsageTally(), {}
        async for chunks in _all(first, rest):
            for c in chunks:
                tally.add(c)
                if not (c.text or c.finish_reason or c.logprobs):
                    continue
                logprobs = None
                if c.logprobs is not None and tt is not None:
                    logprobs = fmt.completion_logprobs(c.logprobs, tt, offsets.get(c.index, 0))
                    offsets[c.index] = offsets.get(c.index, 0) + sum(len(t) for t in logprobs["tokens"])
                yield fmt.sse(fmt.completion_chunk(rid, model, created, c, logprobs))
        if include_usage:
            yield fmt.sse(fmt.usage_chunk(rid, model, created, "text_completion", tally.usage()))
    return events


def chat_events(rid: str, model: str, include_usage: bool,
                tt: Optional[fmt.TokenText] = None) -> Events:
    async def events(first, rest) -> AsyncIterator[str]:
        created, tally, started = int(time.time()), _UsageTally(), set()
        async for chunks in _all(first, rest):
            for c in chunks:
                tally.add(c)
                if c.index not in started:
                    started.add(c.index)
                    yield fmt.sse(fmt.chat_chunk(rid, model, created, c.index,
                                                 {"role": "assistant", "content": ""}))
                if c.text or c.logprobs:
                    logprobs = (fmt.chat_logprobs(c.logprobs, tt)
                                if c.logprobs is not None and tt is not None else None)
                    yield fmt.sse(fmt.chat_chunk(rid, model, created, c.index, {"content": c.text},
                                                 logprobs=logprobs))
                if c.finish_reason:
                    yield fmt.sse(fmt.chat_chunk(rid, model, created, c.index, {}, c.finish_reason))
        if include_usage:
            yield fmt.sse(fmt.usage_chunk(rid, model, created, "chat.completion.chunk", tally.usage()))
    return events
