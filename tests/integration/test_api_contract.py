"""The API contract on real Ray Serve (random:tiny on CPU): bad input, API keys, overload, a replica
killed mid-request, and a drain on shutdown. One app serves the whole module (a deploy costs
~10-20 s on 2 cores); the tests run in file order and the last one deletes the app.

The app: one replica with 4 KV slots and a queue bound of 2 more sequences (so 6 admitted), a
2 s wait for a replica, Retry-After 1, a 64 KiB body limit, and API keys from a key file.
Every error is checked for OpenAI's format, and the app must keep answering after each.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from deployments import openai_fields as of
from deployments.app import APP_NAME, build_app
from deployments.config import AppArgs
from serve_helpers import wait_for

KEY = "sk-contract-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAPACITY, QUEUED = 4, 2


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from ray import serve

    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# test keys\n{KEY}\n")
    args = AppArgs(model="random:tiny", batch_buckets=[1, 2, 4], max_num_seqs=CAPACITY,
                   max_queued_sequences=QUEUED, max_seq_len=512, num_replicas=1,
                   num_gpus_per_replica=0, replica_wait_s=2, retry_after_s=1,
                   max_request_bytes=64 * 1024, api_keys_file=str(keys),
                   graceful_shutdown_timeout_s=20)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    yield ray_cluster.base_url
    serve.delete(APP_NAME)


def counters() -> dict:
    from ray import serve

    (c,) = serve.get_deployment_handle("LLMReplica", APP_NAME).broadcast("counters").results()
    return c


def post(base: str, path: str, body=None, *, raw: bytes = None, headers=AUTH, timeout=60.0):
    if raw is not None:
        return httpx.post(base + path, content=raw, timeout=timeout,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(base + path, json=body, headers=headers, timeout=timeout)


def assert_openai_error(resp, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_answers(base: str) -> None:
    resp = post(base, "/v1/completions", {"prompt": "still here", "max_tokens": 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1, resp.text


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
# (route, body or raw bytes, status, param)
BAD = [
    (CMPL, {"prompt": "a\ud800b"}, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "a\udfffb"}]}, 400, "messages.0.content"),
    (CMPL, {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "n": True}, 400, "n"),
    (CMPL, {"prompt": "x", "seed": False}, 400, "seed"),
    (CMPL, {"prompt": "x", "temperature": "0.5"}, 400, "temperature"),
    (CHAT, {"messages": MSG, "logprobs": 1}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": MSG, "tool_choice": "auto"}, 400, "tool_choice"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "priority": 1}, 400, "priority"),
    (CMPL, {"prompt": "x", "echo": True}, 400, "echo"),
    (CMPL, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (CMPL, {"prompt": "x", "brand_new_field": 1}, 400, "brand_new_field"),
    (CMPL, {"prompt": "x", "stop": ["s"] * 10_000}, 400, "stop"),
    (CMPL, {"prompt": "x", "n": CAPACITY + 1}, 400, "n"),
    (CMPL, {"prompt": ["x"] * (CAPACITY + 1)}, 400, "prompt"),
    (CMPL, {"prompt": "x", "seed": 2**63}, 400, "seed"),
    (CMPL, {"prompt": [1, 100_000]}, 400, "prompt"),                 # outside the vocabulary
    (CMPL, {"prompt": "x", "logit_bias": {"5000": 1}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x" * 600}, 400, "prompt"),                     # context length
    (CMPL, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (CMPL, b"[" * 50_000 + b"]" * 50_000, 400, None),                 # deep nesting (100 KB > limit)
    (CMPL, b"[" * 20_000 + b"]" * 20_000, 400, None),                 # deep nesting under the limit
    (CMPL, b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", 400, None),
    (CMPL, b"{not json", 400, None),
    (CMPL, b'{"prompt": "\xff\xfe"}', 400, None),
    (CMPL, {"prompt": "y" * 70_000}, 413, None),                       # past max_request_bytes
]
NULLS = {"temperature": None, "top_p": None, "n": None, "max_tokens": None, "stop": None,
         "seed": None, "logprobs": None, "presence_penalty": None, "frequency_penalty": None,
         "logit_bias": None, "stream": None, "stream_options": None, "user": None, "top_k": None}


def test_bad_inputs_are_4xx_in_openai_format_and_the_app_keeps_answering(app):
    for i, (route, body, status, param) in enumerate(BAD):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if status == 413 and len(raw) < 64 * 1024:
            raise AssertionError("the 413 case must exceed the body limit")
        expected = 413 if len(raw) > 64 * 1024 else status
        assert_openai_error(post(app, route, raw=raw), expected, param)
        if i % 8 == 0:
            assert_answers(app)
    # Every refused field of the table, with a value that asks for something.
    for endpoint, route, base in ((of.COMPLETIONS, CMPL, {"prompt": "x"}), (of.CHAT, CHAT, {"messages": MSG})):
        for name in of.refused_for(endpoint):
            assert_openai_error(post(app, route, {**base, name: {"want": 1}}), 400, name)
    assert_answers(app)


def test_documented_nullables_are_accepted(app):
    for route, base in ((CMPL, {"prompt": "x", "max_tokens": 2}), (CHAT, {"messages": MSG, "max_tokens": 2})):
        resp = post(app, route, {**base, **NULLS})
        assert resp.status_code == 200, resp.text
    resp = post(app, CHAT, {"messages": MSG, "max_tokens": 2, "top_logprobs": None,
                            "max_completion_tokens": None, "tools": None, "response_format": {"type": "text"}})
    assert resp.status_code == 200, resp.text


def _app_log_lines() -> list[str]:
    import glob

    import ray
    session = ray._private.worker._global_node.get_session_dir_path()
    lines = []
    for path in glob.glob(f"{session}/logs/serve/replica_{APP_NAME}_*.log"):
        with open(path, errors="replace") as f:
            lines += f.read().splitlines()
    return lines


def test_client_errors_log_one_warning_line_without_a_traceback(app):
    from ray import serve

    from replica.sampling_params import InvalidRequestError

    rid = f"client-error-{time.time_ns()}"
    resp = post(app, CMPL, {"prompt": [1, 100_000], "max_tokens": 2},
                headers={**AUTH, "x-request-id": rid})
    assert_openai_error(resp, 400, "prompt")
    with pytest.raises(InvalidRequestError):   # the Python API: Serve logs what the ingress raises
        serve.get_app_handle(APP_NAME).generate.remote([[1, 100_000]], max_tokens=2).result()

    def logged():
        lines = _app_log_lines()
        mine = [ln for ln in lines if rid in ln and ln.startswith("WARNING")]
        python_api = [ln for ln in lines if "client error 400" in ln]
        return (lines, mine, python_api) if mine and python_api else None

    lines, mine, python_api = wait_for(logged, 20, "the client errors' log lines")
    assert len(mine) == 1 and "param=prompt" in mine[0], mine
    assert not [ln for ln in lines if rid in ln and ln.startswith("ERROR")]
    assert len(python_api) == 1 and python_api[0].startswith("WARNING")
    # Every bad input so far was a client error: no traceback anywhere in this app's logs.
    assert not [ln for ln in lines if "Traceback" in ln], [ln for ln in lines if "Traceback" in ln][:3]


def test_api_keys_guard_every_route_but_health(app):
    assert_openai_error(post(app, CMPL, {"prompt": "x"}, headers={}), 401)
    err = assert_openai_error(post(app, CMPL, {"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "invalid_api_key"
    assert httpx.get(f"{app}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{app}/health", timeout=10).status_code == 200
    import openai
    client = openai.OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="random:tiny", prompt="Hi", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app}/v1", api_key="wrong", max_retries=0).models.list()


def test_overload_gets_429_with_retry_after_and_every_admitted_request_completes(app):
    results: list = []

    def one(i: int) -> None:
        resp = post(app, CMPL, {"prompt": f"load {i}", "max_tokens": 48, "ignore_eos": True},
                    timeout=120)
        results.append(resp)

    before = counters()["refused_batches"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 429]
    assert len(ok) + len(busy) == 24, [r.status_code for r in results]
    assert len(ok) >= CAPACITY + QUEUED and busy
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in ok)       # none dropped
    for r in busy:
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    c = wait_for(lambda: (c := counters())["admitted_sequences"] == 0 and c, 30, "the replica to drain")
    assert c["refused_batches"] - before == len(busy) and c["running"] == 0


def _stream_until_first_event(app: str, out: dict) -> threading.Event:
    started = threading.Event()

    def run() -> None:
        body = {"prompt": "long", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{app}{CMPL}", json=body, headers=AUTH, timeout=60) as resp:
            lines = []
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
            out["stream"] = (resp.status_code, lines)

    threading.Thread(target=run, daemon=True).start()
    return started


def test_a_killed_replica_fails_in_flight_requests_cleanly_then_503_fast_then_recovers(app):
    pid = counters()["pid"]
    out: dict = {}
    started = _stream_until_first_event(app, out)
    plain = threading.Thread(target=lambda: out.setdefault("plain", post(
        app, CMPL, {"prompt": "long", "max_tokens": 480, "ignore_eos": True})), daemon=True)
    plain.start()
    assert started.wait(30)
    time.sleep(0.2)
    outage: dict = {"completions": [], "health": []}
    os.kill(pid, signal.SIGKILL)          # the decode replica of this test's own cluster
    killed_at = time.monotonic()
    # Watch the outage from the moment of the kill (not after the in-flight requests end: a quick
    # restart could be over by then, and the replica wait hides an outage shorter than its bound).
    watcher = threading.Thread(target=_watch_outage, args=(app, outage), daemon=True)
    watcher.start()
    wait_for(lambda: "stream" in out and "plain" in out, 30, "both in-flight requests to end")
    # Non-streaming: a 503 in OpenAI format, no Ray internals.
    err = assert_openai_error(out["plain"], 503)
    assert err["code"] == "replica_failed" and int(out["plain"].headers["retry-after"]) >= 1
    status, lines = out["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])["error"]
    assert last["code"] == "replica_failed"
    for text in (out["plain"].text, lines[-2]):
        assert not any(s in text for s in ("actor", "pid", "namespace", "192.", "127.0.0.1", "SERVE_"))
    # During the outage: 503 + Retry-After within the wait bound, /health 503; then recovery.
    watcher.join(100)
    assert not watcher.is_alive() and outage.get("recovered"), "the app did not recover within 90 s"
    assert 503 in outage["health"], "/health never reported the outage"
    for resp, took in outage["completions"]:
        if resp.status_code == 503:
            assert took < 2 + 2 + 3, f"a request during the outage took {took:.1f} s"
            assert assert_openai_error(resp, 503)["code"] in ("no_replica_ready", "replica_failed")
            assert int(resp.headers["retry-after"]) >= 1
        else:
            assert resp.status_code == 200, resp.text   # waited through the restart, then served
    print(f"recovered {time.monotonic() - killed_at:.1f} s after the kill")
    assert counters()["pid"] != pid


def _watch_outage(app: str, outage: dict) -> None:
    """From a replica kill until the app is healthy again after /health said 503 (at most 90 s):
    poll /health every 0.1 s while another thread sends a 2-token completion every ~0.5 s (one that
    waits through the restart must not hide the outage from the poll), recording what came back."""
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            resp = post(app, CMPL, {"prompt": "x", "max_tokens": 2})
            outage["completions"].append((resp, time.monotonic() - t0))
            done.wait(0.5)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        health = httpx.get(f"{app}/health", timeout=10).status_code
        outage["health"].append(health)
        if health == 200 and 503 in outage["health"]:
            outage["recovered"] = True
            break
        time.sleep(0.1)
    done.set()
    sender.join(30)


def test_shutdown_drains_in_flight_requests(app):
    from ray import serve

    out: dict = {}
    started = _stream_until_first_event(app, out)
    assert started.wait(30)
    serve.delete(APP_NAME, _blocking=False)
    wait_for(lambda: "stream" in out, 60, "the in-flight stream to finish")
    status, lines = out["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    finals = [json.loads(x[6:]) for x in lines[:-1]]
    assert all("error" not in f for f in finals), finals[-1]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
