"""The OpenAI-compatible HTTP API: `build_openai_app(frontend, ...) -> FastAPI`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.
Requests are validated by `deployments.openai_schema` (every field honoured or refused:
docs/openai-fields.md); streams are `deployments.http_stream`; API keys and the body limit are
`deployments.http_guard` middleware (`/health` stays open).

Every error is OpenAI's error body `{"error": {message, type, param, code}}`, classified once by
`deployments.errors.describe`: 400 bad input (validation, FastAPI's 422 included; `param` names the
field), 401 missing/wrong API key, 404 unknown model or route, 405, 413 body too large, 429 queue
bound reached and 503 no replica ready / replica died (both with `Retry-After`), 500 otherwise
(generic message; the traceback is logged). Client errors log one WARNING line, no traceback.
`GET /health` is 200 while a replica can serve and 503 (with `Retry-After`) while none can.

No Ray here: the app talks to a `Frontend`, so tests run it with FastAPI's TestClient and a fake
backend.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import openai_format as fmt
from deployments.errors import ApiError, describe, validation_error
from deployments.frontend import Frontend
from deployments.http_guard import ApiKeyMiddleware, ApiKeys, BodyLimitMiddleware
from deployments.http_stream import chat_events, completion_events, start_stream
from deployments.openai_schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("ray.serve")
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
NOT_READY_RETRY_AFTER_S = 5


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message quoting client text can never fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def respond(err: ApiError, request: Optional[Request] = None,
            user: Optional[str] = None) -> JSONResponse:
    """The JSON answer for `err`, logged once: 4xx as one WARNING line, 5xx as ERROR."""
    where = f"{request.method} {request.url.path}" if request is not None else "-"
    who = f" user={user[:64]!r}" if user else ""
    if err.status >= 500 and err.code == "internal_error":
        pass   # logged with its traceback by the caller
    elif err.status >= 500:
        log.error("graphserve: %d %s%s (%s): %s", err.status, where, who, err.code, err.message)
    else:
        log.warning("graphserve: %d %s%s (%s, param=%s): %.300s", err.status, where, who, err.code,
                    err.param, err.message)
    return _AsciiJSONResponse(err.body, status_code=err.status, headers=err.response_headers())


def _failure(e: Exception, request: Request, user: Optional[str] = None) -> JSONResponse:
    err = describe(e)
    if err.status >= 500 and err.code == "internal_error":
        log.exception("graphserve: %s %s failed (user=%r)", request.method, request.url.path, user)
    return respond(err, request, user)


def build_openai_app(frontend: Frontend, *, api_keys: Optional[ApiKeys] = None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="graphserve", description="OpenAI-compatible LLM decode on Ray Serve")
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if api_keys is not None and api_keys.enabled:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)   # outermost: 401 before the body
    model = frontend.model_name

    @app.get("/health")
    async def health():
        if await frontend.ready():
            return {"status": "ok", "model": model}
        return _AsciiJSONResponse({"status": "unavailable", "model": model,
                                   "detail": "no model replica is ready to serve"},
                                  status_code=503,
                                  headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)})

    @app.get("/v1/models")
    async def models() -> dict:
        return fmt.models_body(model, frontend.max_seq_len)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if (bad := _check_model(model, req.model)) is not None:
            return respond(bad, request)
        try:
            batch, hint = frontend.prepare(req.prompt_list(), req.params_kwargs(req.max_tokens),
                                           n=req.samples, user=req.end_user())
            rid = fmt.new_id("cmpl")
            if not req.streaming:
                res = await frontend.generate(batch, hint)
                return fmt.completion_body(rid, model, res.completions, res.usage, frontend.token_text)
            events = completion_events(rid, model, req.include_usage, frontend.token_text)
            return await start_stream(frontend.stream(batch, hint), events)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error
            return _failure(e, request, req.end_user())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        if (bad := _check_model(model, req.model)) is not None:
            return respond(bad, request)
        try:
            params = req.params_kwargs(req.requested_max_tokens())
            batch, hint = frontend.prepare_chat([req.message_dicts()], params, n=req.samples,
                                                user=req.end_user())
            rid = fmt.new_id("chatcmpl")
            if not req.streaming:
                res = await frontend.generate(batch, hint)
                return fmt.chat_body(rid, model, res.completions, res.usage, frontend.token_text)
            events = chat_events(rid, model, req.include_usage, frontend.token_text)
            return await start_stream(frontend.stream(batch, hint), events)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error
            return _failure(e, request, req.end_user())

    return app


def _check_model(served: str, model: Optional[str]) -> Optional[ApiError]:
    if model is None or model == served:
        return None
    return ApiError(404, f"The model '{model[:200]}' does not exist; this server serves '{served}'",
                    "model", "model_not_found")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return respond(validation_error(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return respond(ApiError(status, str(exc.detail), code=code), request)
