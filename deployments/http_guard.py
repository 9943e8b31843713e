"""What stands in front of the OpenAI routes: API keys and the request body limit (ASGI middleware).

API keys (optional):
- Sources: the environment variable `GRAPHSERVE_API_KEYS` (keys separated by commas or
  whitespace) and/or a key file (`AppArgs.api_keys_file`, or `GRAPHSERVE_API_KEYS_FILE`): one key
  per line, blank lines and `#` comments ignored; on Kubernetes a mounted Secret. Never app.yaml
  text: the config names a file, not a key.
- No source configured: authentication is off. A configured file that is missing or holds no key
  fails the ingress at startup (fail closed). The file is read again when its mtime changes
  (checked at most once a second), so a rotated Secret applies without a restart; a failed re-read
  keeps the last good keys.
- Every route except `OPEN_PATHS` (`/health`) needs `Authorization: Bearer <key>`; a missing or
  wrong key is a 401 in OpenAI's format (`code: invalid_api_key`). Keys are compared in constant
  time (`hmac.compare_digest` over SHA-256 digests, every key checked). Ray's metrics port is
  another server and is not affected.

Body limit: a request body larger than `max_body_bytes` is a 413 in OpenAI's format, refused from
`Content-Length` before reading, or as soon as a chunked body passes the limit.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from typing import Mapping, Optional

from starlette.exceptions import HTTPException

from deployments.errors import ApiError

log = logging.getLogger("ray.serve")

ENV_KEYS = "GRAPHSERVE_API_KEYS"
ENV_KEYS_FILE = "GRAPHSERVE_API_KEYS_FILE"
OPEN_PATHS = frozenset({"/health"})
RELOAD_PERIOD_S = 1.0


class ApiKeyError(ValueError):
    """The configured key source is unusable (missing file, no keys): the ingress must not start."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _parse_file(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


class ApiKeys:
    def __init__(self, keys: Optional[list[str]] = None, path: Optional[str] = None,
                 clock=time.monotonic):
        self._static = [_digest(k) for k in keys or []]
        self._path = path
        self._clock = clock
        self._file: list[bytes] = []
        self._mtime: Optional[float] = None
        self._checked = 0.0
        if path is not None:
            self._load(first=True)

    @classmethod
    def from_sources(cls, path: Optional[str] = None, env: Mapping[str, str] = os.environ) -> "ApiKeys":
        keys = [k for k in env.get(ENV_KEYS, "").replace(",", " ").split() if k]
        return cls(keys, path or env.get(ENV_KEYS_FILE) or None)

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._path is not None

    def _load(self, first: bool = False) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime == self._mtime:
                return
            with open(self._path, encoding="utf-8") as f:
                keys = _parse_file(f.read())
            if not keys:
                raise ApiKeyError(f"API key file {self._path} holds no key")
        except (OSError, UnicodeDecodeError, ApiKeyError) as e:
            if first:
                raise ApiKeyError(f"API keys: cannot use {self._path}: {e}") from None
            log.warning("graphserve: API key file unreadable (%s); keeping the previous keys", e)
            return
        self._file, self._mtime = [_digest(k) for k in keys], mtime
        if not first:
            log.info("graphserve: API keys reloaded from %s (%d keys)", self._path, len(keys))

    def check(self, presented: Optional[str]) -> bool:
        if self._path is not None and self._clock() - self._checked >= RELOAD_PERIOD_S:
            self._checked = self._clock()
            self._load()
        got = _digest(presented or "")
        ok = False
        for key in self._static + self._file:   # no early exit: time does not depend on which key
            ok |= hmac.compare_digest(got, key)
        return ok and bool(presented)


def _bearer(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.response_headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not self.keys.enabled:
            return await self.app(scope, receive, send)
        token = _bearer(scope.get("headers", []))
        if self.keys.check(token):
            return await self.app(scope, receive, send)
        message = ("Missing API key: send it as 'Authorization: Bearer <key>'." if token is None
                   else "Incorrect API key provided.")
        log.warning("graphserve: 401 %s %s: %s", scope.get("method"), scope["path"], message)
        await send_error(send, ApiError(401, message, code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"}))


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than {self.limit} bytes.",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.limit:
                log.warning("graphserve: 413 %s %s: %s bytes", scope.get("method"), scope["path"],
                            int(value))
                return await send_error(send, self._too_large())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:   # FastAPI re-raises an HTTPException from the body read
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)
