"""API keys and the body limit (deployments/http_guard.py) on the real FastAPI app, no Ray."""
from __future__ import annotations

import hmac
import os
import time

import pytest
from fastapi.testclient import TestClient

from deployments.http_api import build_openai_app
from deployments.http_guard import ApiKeyError, ApiKeys
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import make_frontend

BODY = {"prompt": "x", "max_tokens": 1}


def app_with(keys: ApiKeys = None, max_body_bytes: int = 16 * 2**20) -> TestClient:
    frontend, _ = make_frontend()
    return TestClient(build_openai_app(frontend, api_keys=keys, max_body_bytes=max_body_bytes))


def test_keys_from_the_environment_guard_every_route_but_health():
    client = app_with(ApiKeys.from_sources(env={"GRAPHSERVE_API_KEYS": "k-one, k-two"}))
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                            ({"Authorization": "Basic k-one"}, 401), ({"Authorization": "Bearer "}, 401),
                            ({"Authorization": "Bearer k-one"}, 200), ({"Authorization": "Bearer k-two"}, 200)]:
        resp = client.post("/v1/completions", json=BODY, headers=headers)
        assert resp.status_code == status, (headers, resp.text)
        if status == 401:
            err = resp.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert resp.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200          # probes need no key
    assert client.get("/v1/models", headers={"Authorization": "Bearer k-two"}).status_code == 200


def test_no_key_source_means_no_authentication():
    keys = ApiKeys.from_sources(env={})
    assert not keys.enabled
    assert app_with(keys).post("/v1/completions", json=BODY).status_code == 200


def test_key_file_is_read_and_rotated_without_a_restart(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated monthly\nfirst-key\n\n")
    now = [0.0]
    keys = ApiKeys(path=str(path), clock=lambda: now[0])
    client = app_with(keys)
    auth = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    assert client.post("/v1/completions", json=BODY, headers=auth("first-key")).status_code == 200
    path.write_text("second-key\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    now[0] = 2.0                                              # past the reload period
    assert client.post("/v1/completions", json=BODY, headers=auth("first-key")).status_code == 401
    assert client.post("/v1/completions", json=BODY, headers=auth("second-key")).status_code == 200
    path.unlink()                                             # a failed re-read keeps the last keys
    now[0] = 4.0
    assert client.post("/v1/completions", json=BODY, headers=auth("second-key")).status_code == 200


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"])
def test_a_configured_key_file_that_is_missing_or_empty_fails_closed(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ApiKeyError):
        ApiKeys.from_sources(str(path), env={})


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    keys = ApiKeys(["aaa", "bbb", "ccc"])
    assert keys.check("aaa") and not keys.check("zzz")
    assert len(calls) == 6                                    # no early exit on the first match
    assert all(len(a) == len(b) == 32 for a, b in calls)      # digests: length leaks nothing


def test_oversize_bodies_are_413_in_openai_format_and_the_app_keeps_answering():
    client = app_with(max_body_bytes=4096)
    big = {"prompt": "x" * 5000}
    resp = client.post("/v1/completions", json=big)          # Content-Length says too big
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunked():                                            # no Content-Length: counted as read
        for _ in range(10):
            yield b'{"prompt": "' + b"y" * 1000
    resp = client.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json=BODY).status_code == 200
