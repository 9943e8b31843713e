"""What a failure means to a client: typed errors, and the one map from an exception to an HTTP answer.

Contract: `describe(exc) -> ApiError` classifies anything raised while serving a request (here, in a
replica, or by Ray on the way) into a status, an OpenAI error body and a `Retry-After`:

| raised                                                         | status | retry |
|----------------------------------------------------------------|--------|-------|
| `InvalidRequestError` (bad input; the frontend's RequestError)  | 400    |       |
| `ServerOverloadedError` (a replica's queue bound) or Serve's    | 429    | yes   |
| `BackPressureError` (`max_queued_requests` at the caller)       |        |       |
| `NoReplicaError` (none ready within `replica_wait_s`), a replica | 503    | yes   |
| that died (Ray's actor errors, Serve's Replica/Deployment-      |        |       |
| UnavailableError), an engine that died (`EngineDeadError`)      |        |       |
| anything else                                                   | 500    |       |

Messages of 503 and 500 answers are fixed sentences: no actor id, pid, address, namespace or
traceback leaves the server (those are logged). Ray wraps an exception raised in a replica as
`RayTaskError(cause)`; `describe` looks at `.cause`.

`ClientErrorLogFilter` turns Ray Serve's `logger.exception("Request failed.")` for a client error
(400/429) into one WARNING line without a traceback; server errors keep theirs. The decode replica
drops its line for a 429 altogether: the ingress that answers the client logs it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from replica.sampling_params import InvalidRequestError

log = logging.getLogger("ray.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable_error"}
DEFAULT_RETRY_AFTER_S = 2


class ServerOverloadedError(RuntimeError):
    """A replica refused a batch because admitting it would exceed its queue bound. Raised before
    any of the batch's sequences reach the engine, so nothing admitted is ever dropped."""

    def __init__(self, message: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (str(self), self.retry_after_s))


class NoReplicaError(RuntimeError):
    """No decode replica was ready to take the request within the configured wait."""

    def __init__(self, message: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (str(self), self.retry_after_s))


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    param: Optional[str] = None
    code: Optional[str] = None
    retry_after_s: Optional[float] = None
    headers: dict = field(default_factory=dict)

    @property
    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response_headers(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.retry_after_s is not None:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return h


def error_body(status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error object: `{"error": {message, type, param, code}}`."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


REPLICA_FAILED = ("The model replica serving this request stopped before it finished. "
                  "Retry the request.")
INTERNAL = "The server failed while handling this request. Retry the request, or report it."
# Ray and Serve exceptions that mean "the replica is gone", matched by class name so this module
# needs no Ray import (the HTTP layer runs without Ray in unit tests).
_REPLICA_GONE = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "ReplicaUnavailableError",
                 "DeploymentUnavailableError", "EngineDeadError", "WorkerCrashedError",
                 "NodeDiedError", "ObjectLostError", "OwnerDiedError"}


def cause_of(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrapper (`RayTaskError.cause`), else `exc`."""
    return getattr(exc, "cause", None) or exc


def _named(exc: BaseException, names: set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def describe(exc: BaseException, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> ApiError:
    cause = cause_of(exc)
    if isinstance(cause, InvalidRequestError) or isinstance(exc, InvalidRequestError):
        src = cause if isinstance(cause, InvalidRequestError) else exc
        param, code = getattr(src, "param", None), getattr(src, "code", None)
        return ApiError(400, str(src), param, code or ("invalid_value" if param else None))
    if isinstance(cause, ServerOverloadedError):
        return ApiError(429, str(cause), code="server_overloaded", retry_after_s=cause.retry_after_s)
    if _named(cause, {"BackPressureError"}):
        return ApiError(429, "The server is at its queue limit. Retry after the delay in Retry-After.",
                        code="server_overloaded", retry_after_s=retry_after_s)
    if isinstance(cause, NoReplicaError):
        return ApiError(503, str(cause), code="no_replica_ready", retry_after_s=cause.retry_after_s)
    if _named(cause, _REPLICA_GONE) or _named(exc, _REPLICA_GONE):
        return ApiError(503, REPLICA_FAILED, code="replica_failed", retry_after_s=retry_after_s)
    return ApiError(500, INTERNAL, code="internal_error")


def is_client_error(exc: BaseException) -> bool:
    return describe(exc).status < 500


def validation_error(errors) -> ApiError:
    """A 400 from pydantic/FastAPI validation errors, naming the field as `param`. A union field
    (`prompt`, `stop`) fails once per member; the most specific error is reported: a failed
    constraint over a type mismatch, then the deepest location."""
    if not errors:
        return ApiError(400, "invalid request", code="invalid_value")
    err = min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
    # Union members add their type to the location (('body', 'prompt', 'list[int]', 0)): drop it.
    path = [str(x) for x in err.get("loc", ())
            if x != "body" and not (isinstance(x, str) and _is_type_tag(x))]
    param = ".".join(path) or None
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param,
                        "unknown_parameter")
    if err.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.", None, "invalid_json")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}" if param else msg, param, "invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: str) -> bool:
    return (part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-"))
            or part.startswith(("json-or-python", "lax-", "strict-")))


class ClientErrorLogFilter(logging.Filter):
    """On Ray Serve's logger: a record carrying a client error's exception becomes one WARNING line
    (or is dropped, for the error codes in `drop_codes`)."""

    def __init__(self, drop_codes: tuple[str, ...] = ()):
        super().__init__()
        self.drop_codes = drop_codes

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_client_error(exc):
            err = describe(exc)
            if err.code in self.drop_codes:
                return False
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "client error %d (%s): %s", (err.status, err.code, err.message)
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filter(drop_codes: tuple[str, ...] = (), logger_name: str = "ray.serve") -> None:
    """Idempotent: add the filter to Serve's logger in this process (each replica calls it)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.addFilter(ClientErrorLogFilter(drop_codes))
