"""Failures as clients see them, without Ray running: the exception -> status map
(deployments/errors.py), the HTTP answers for a backend that fails (429, 503 with Retry-After,
no Ray internals), /health while no replica runs, the client-error log filter, and ReplicaWatch's
bounded wait for a replica."""
from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import ray.exceptions as rex
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import (ClientErrorLogFilter, NoReplicaError, ServerOverloadedError,
                                describe)
from deployments.http_api import build_openai_app
from deployments.replica_watch import ReplicaWatch
from replica.sampling_params import InvalidRequestError
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import make_frontend

SECRET = "actor_id: 1ff0e71f pid: 5176 ip: 192.0.2.2 namespace: serve SERVE_REPLICA::x#D"


def wrapped(cause: BaseException) -> BaseException:
    """What a handle call raises when the replica raised `cause`."""
    return rex.RayTaskError("generate", f"Traceback ... {SECRET}", cause).as_instanceof_cause()


@pytest.mark.parametrize("exc, status, code, retry", [
    (InvalidRequestError("bad", "temperature"), 400, "invalid_value", False),
    (wrapped(InvalidRequestError("bad", "top_p", "x")), 400, "x", False),
    (wrapped(ServerOverloadedError("full", 3)), 429, "server_overloaded", True),
    (BackPressureError(5, 5), 429, "server_overloaded", True),
    (NoReplicaError("none"), 503, "no_replica_ready", True),
    (rex.ActorDiedError(), 503, "replica_failed", True),
    (rex.ActorUnavailableError(SECRET, None), 503, "replica_failed", True),
    (DeploymentUnavailableError("x"), 503, "replica_failed", True),
    (wrapped(type("EngineDeadError", (RuntimeError,), {})(SECRET)), 503, "replica_failed", True),
    (wrapped(RuntimeError(SECRET)), 500, "internal_error", False),
    (KeyError(SECRET), 500, "internal_error", False),
])
def test_every_failure_maps_to_one_status_without_internals(exc, status, code, retry):
    err = describe(exc)
    assert (err.status, err.code) == (status, code)
    assert ("Retry-After" in err.response_headers()) == retry
    if status >= 500:
        assert not any(s in err.message for s in ("actor", "pid", "192.0.2", "namespace", "SERVE_"))


def test_typed_errors_survive_pickling_across_ray():
    import pickle
    e = pickle.loads(pickle.dumps(ServerOverloadedError("full", 4.0)))
    assert isinstance(e, ServerOverloadedError) and e.retry_after_s == 4.0
    e = pickle.loads(pickle.dumps(InvalidRequestError("bad", "seed", "c")))
    assert (e.param, e.code) == ("seed", "c")


class FailingBackend:
    """A Frontend backend whose calls raise `exc`, and whose readiness is settable."""

    def __init__(self, exc: BaseException):
        self.exc, self.is_ready = exc, True

    async def ready(self) -> bool:
        return self.is_ready

    async def generate(self, batch, hint):
        raise self.exc

    async def stream(self, batch, hint):
        raise self.exc
        yield


def client_for(exc: BaseException) -> tuple[TestClient, FailingBackend]:
    frontend, _ = make_frontend()
    backend = FailingBackend(exc)
    frontend.backend = backend
    return TestClient(build_openai_app(frontend)), backend


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("exc, status", [(wrapped(ServerOverloadedError("full", 3)), 429),
                                         (rex.ActorDiedError(), 503), (NoReplicaError("none", 2), 503)])
def test_overload_and_outage_answers_are_openai_json_with_retry_after(exc, status, stream):
    client, _ = client_for(exc)
    resp = client.post("/v1/completions", json={"prompt": "x", "stream": stream})
    assert resp.status_code == status and resp.headers["content-type"] == "application/json"
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["type"] == {429: "rate_limit_error", 503: "service_unavailable_error"}[status]
    assert "actor" not in err["message"] and "pid" not in err["message"]


def test_a_replica_dying_mid_stream_is_a_clean_error_event():
    frontend, _ = make_frontend()

    class DiesAfterOne:
        async def generate(self, batch, hint):
            raise AssertionError("not used")

        async def stream(self, batch, hint):
            from deployments.protocol import StreamChunk
            yield [StreamChunk(0, 0, "a", (97,))]
            raise rex.ActorDiedError()

    frontend.backend = DiesAfterOne()
    with TestClient(build_openai_app(frontend)) as client:
        resp = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    blocks = [b for b in resp.text.split("\n\n") if b]
    assert resp.status_code == 200 and blocks[-1] == "data: [DONE]"
    assert '"code":"replica_failed"' in blocks[-2] and "actor" not in blocks[-2].lower()


def test_health_is_503_while_no_replica_can_serve():
    client, backend = client_for(RuntimeError())
    assert client.get("/health").status_code == 200
    backend.is_ready = False
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert resp.json()["status"] == "unavailable"


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord("ray.serve", logging.ERROR, "replica.py", 1, "Request failed.", (),
                                 sys.exc_info())


def test_client_errors_log_one_warning_line_and_server_errors_keep_the_traceback():
    f = ClientErrorLogFilter()
    client = _record(wrapped(InvalidRequestError("prompt token ids must be in [0, 259)")))
    assert f.filter(client) and client.levelno == logging.WARNING and client.exc_info is None
    assert "\n" not in client.getMessage() and "[0, 259)" in client.getMessage()
    server = _record(wrapped(RuntimeError("boom")))
    assert f.filter(server) and server.levelno == logging.ERROR and server.exc_info is not None
    # The decode replica drops its 429 line: the ingress answering the client logs it.
    replica = ClientErrorLogFilter(drop_codes=("server_overloaded",))
    assert not replica.filter(_record(wrapped(ServerOverloadedError("full"))))
    assert replica.filter(_record(wrapped(InvalidRequestError("bad"))))


def run(coro):
    return asyncio.run(coro)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watch_gives_up_after_wait_s_without_a_replica_and_cancels_the_call():
    running = [1]
    cancelled = []

    async def scenario():
        watch = ReplicaWatch(lambda: running[0], wait_s=0.2, period_s=0.02, retry_after_s=3)

        async def call():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        running[0] = 0
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(NoReplicaError) as err:
            await watch.bounded(call())
        waited = asyncio.get_running_loop().time() - t0
        assert 0.2 <= waited < 1.0 and err.value.retry_after_s == 3
        assert not await watch.ready()
        await asyncio.sleep(0)

    run(scenario())
    assert cancelled == [True]


def test_watch_never_cuts_a_call_short_while_a_replica_runs():
    async def scenario():
        watch = ReplicaWatch(lambda: 1, wait_s=0.05, period_s=0.01)

        async def slow():
            await asyncio.sleep(0.3)
            return "done"

        assert await watch.bounded(slow()) == "done"
        assert await watch.ready()

    run(scenario())


def test_an_answer_from_a_replica_means_one_runs_before_the_status_says_so():
    clock = Clock()

    async def scenario():
        watch = ReplicaWatch(lambda: 0, wait_s=5, period_s=1, clock=clock)
        assert not await watch.ready()                 # the controller says none is running yet

        async def answer():
            return "ok"

        assert await watch.bounded(answer()) == "ok"
        assert await watch.ready()                     # cached view updated by the answer

    run(scenario())


def test_watch_keeps_its_last_view_when_the_status_source_fails():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("controller restarting")
        return 2

    clock = Clock()

    async def scenario():
        watch = ReplicaWatch(flaky, wait_s=1, period_s=1, clock=clock)
        assert await watch.running() == 2
        clock.t = 5
        assert await watch.running() == 2 and len(calls) == 2
        clock.t = 5.5                       # within the period: cached, not asked again
        assert await watch.running() == 2 and len(calls) == 2

    run(scenario())
