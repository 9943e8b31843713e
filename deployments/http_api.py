"""The OpenAI-compatible HTTP API: `build_openai_app(frontend) -> FastAPI`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.
Streaming answers are server-sent events in OpenAI's chunk format ending with `data: [DONE]`; with
`stream_options.include_usage` a last chunk carries `usage`. Every error is OpenAI's error body
(`{"error": {message, type, param, code}}`): validation failures and `InvalidRequestError` are 400
(FastAPI's 422 included), an unknown model 404, unknown routes 404/405.

A stream is started only after its first chunk has arrived, so a request the replica refuses still
gets a proper 400; an error after that point is sent as an error event before `[DONE]`. When the
client disconnects, Starlette cancels the response, which closes the replica stream and so aborts
the batch's sequences in the engine.

No Ray here: the app talks to a `Frontend`, so tests run it with FastAPI's TestClient and a fake
backend.
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import openai_schema as oa
from deployments.frontend import Frontend
from deployments.protocol import StreamChunk, Usage
from replica.sampling_params import InvalidRequestError

log = logging.getLogger("ray.serve")


def error_response(status: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(oa.error_body(status, message, param, code), status_code=status)


def user_message(e: BaseException) -> str:
    """The message of an exception raised here or in a replica (Ray wraps those; `.cause` is
    the original)."""
    return str(getattr(e, "cause", None) or e)


def _invalid_request(e: InvalidRequestError) -> JSONResponse:
    cause = getattr(e, "cause", None) or e
    return error_response(400, str(cause), getattr(cause, "param", None), getattr(cause, "code", None))


def build_openai_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="graphserve", description="OpenAI-compatible LLM decode on Ray Serve")
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": frontend.model_name}

    @app.get("/v1/models")
    async def models() -> dict:
        return oa.models_body(frontend.model_name, frontend.max_seq_len)

    @app.post("/v1/completions")
    async def completions(req: oa.CompletionRequest):
        if (bad := _check_model(frontend, req.model)) is not None:
            return bad
        batch, hint = frontend.prepare(req.prompt_list(), req.params_kwargs(req.max_tokens), n=req.n)
        rid = oa.new_id("cmpl")
        if not req.stream:
            res = await frontend.generate(batch, hint)
            return oa.completion_body(rid, frontend.model_name, res.completions, res.usage)
        events = _completion_events(rid, frontend.model_name, req.include_usage, batch.n)
        return await _start_stream(frontend.stream(batch, hint), events)

    @app.post("/v1/chat/completions")
    async def chat(req: oa.ChatCompletionRequest):
        if (bad := _check_model(frontend, req.model)) is not None:
            return bad
        params = req.params_kwargs(req.requested_max_tokens())
        batch, hint = frontend.prepare_chat([req.message_dicts()], params, n=req.n)
        rid = oa.new_id("chatcmpl")
        if not req.stream:
            res = await frontend.generate(batch, hint)
            return oa.chat_body(rid, frontend.model_name, res.completions, res.usage)
        events = _chat_events(rid, frontend.model_name, req.include_usage, batch.n)
        return await _start_stream(frontend.stream(batch, hint), events)

    return app


def _check_model(frontend: Frontend, model: Optional[str]) -> Optional[JSONResponse]:
    if model is None or model == frontend.model_name:
        return None
    return error_response(404, f"The model '{model}' does not exist; this server serves "
                               f"'{frontend.model_name}'", "model", "model_not_found")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        return JSONResponse(oa.validation_error_body(exc.errors()), status_code=400)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, exc: InvalidRequestError):
        return _invalid_request(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code
        return error_response(status, str(exc.detail), code="not_found" if status == 404 else None)


# ---- streaming ----------------------------------------------------------------------------------

async def _start_stream(chunks: AsyncIterator[list[StreamChunk]], events) -> StreamingResponse:
    """Wait for the first chunk list (a refused request raises here and becomes a 400), then
    stream `events(first, rest)`."""
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
    """Report a failure mid-stream as an error event, always end with [DONE], and close the
    source when the client goes away."""
    try:
        async for event in events:
            yield event
    except InvalidRequestError as e:
        yield oa.sse(oa.error_body(400, user_message(e)))
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
        log.exception("stream failed")
        yield oa.sse(oa.error_body(500, f"the stream failed: {user_message(e)}"))
    finally:
        await _aclose(source)
    yield oa.sse("[DONE]")


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def _all(first: list[StreamChunk], rest) -> AsyncIterator[list[StreamChunk]]:
    yield first
    async for chunks in rest:
        yield chunks


class _UsageTally:
    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, c: StreamChunk) -> None:
        self.prompt[c.prompt_index] = c.prompt_tokens
        self.completion[c.index] = c.completion_tokens

    def usage(self) -> Usage:
        p, c = sum(self.prompt.values()), sum(self.completion.values())
        return Usage(p, c, p + c)


def _completion_events(rid: str, model: str, include_usage: bool, n: int):
    async def events(first, rest) -> AsyncIterator[str]:
        created, tally = int(time.time()), _UsageTally(n)
        async for chunks in _all(first, rest):
            for c in chunks:
                tally.add(c)
                if c.text or c.finish_reason:
                    yield oa.sse(oa.completion_chunk(rid, model, created, c))
        if include_usage:
            yield oa.sse(oa.usage_chunk(rid, model, created, "text_completion", tally.usage()))
    return events


def _chat_events(rid: str, model: str, include_usage: bool, n: int):
    async def events(first, rest) -> AsyncIterator[str]:
        created, tally, started = int(time.time()), _UsageTally(n), set()
        async for chunks in _all(first, rest):
            for c in chunks:
                tally.add(c)
                if c.index not in started:
                    started.add(c.index)
                    yield oa.sse(oa.chat_chunk(rid, model, created, c.index,
                                               {"role": "assistant", "content": ""}))
                if c.text:
                    yield oa.sse(oa.chat_chunk(rid, model, created, c.index, {"content": c.text}))
                if c.finish_reason:
                    yield oa.sse(oa.chat_chunk(rid, model, created, c.index, {}, c.finish_reason))
        if include_usage:
            yield oa.sse(oa.usage_chunk(rid, model, created, "chat.completion.chunk", tally.usage()))
    return events
