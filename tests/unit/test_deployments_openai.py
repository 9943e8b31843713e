"""The OpenAI HTTP API without Ray: FastAPI's TestClient on `build_openai_app`, with a Frontend
whose backend runs batches on a FakeEngine in-process. Checks the wire format, SSE streaming, the
routing hint, and that every bad input is a 4xx in OpenAI's error format."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.http_api import build_openai_app
from replica.block_hash import prefix_summary
from router.stats import RoutingHint
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import FAIL_AFTER_FIRST, HANG, REFUSE, make_frontend

MODEL = "random:tiny"


@pytest.fixture
def api():
    frontend, backend = make_frontend(max_seq_len=64)
    with TestClient(build_openai_app(frontend)) as client:
        yield client, backend


def events(resp) -> list:
    """The SSE data payloads of a streamed response (JSON decoded, '[DONE]' kept as text)."""
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    return err


def test_completion_with_a_prompt_list_and_n(api):
    client, backend = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": ["hi", "hello"], "n": 2,
                                                "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "abc" and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}
    # The router sees the batch's shape: 4 sequences, the longest needing 5 + 3 positions.
    (batch, hint), = backend.calls
    assert (hint.num_sequences, hint.max_total_tokens) == (4, 8)
    assert (hint.prompt_tokens, hint.max_new_tokens, hint.samples_per_prompt) == (14, 12, 2)
    assert hint.prefix_hashes == ((), ())      # prompts shorter than one block have no full block
    assert batch.prompts == (tuple(b"hi"), tuple(b"hello")) and batch.params.temperature == 0


def test_token_id_prompts_and_unknown_fields(api):
    client, backend = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2,
                                                "some_future_field": {"x": 1}})
    assert resp.status_code == 200, resp.text
    assert backend.calls[0][0].prompts == ((1, 2, 3),)


def test_completion_stream_is_sse_in_openai_chunk_format(api):
    client, _ = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                                "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    ev = events(resp)
    assert ev[-1] == "[DONE]"
    chunks = [e for e in ev[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert ev[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_chat_goes_through_the_chat_template(api):
    client, backend = api
    resp = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 2,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    template = [256] + list(b"system: be brief\nuser: hi\nassistant: ")
    assert backend.calls[0][0].prompts == (tuple(template),)


def test_chat_defaults_max_tokens_to_the_rest_of_the_context(api):
    client, backend = api
    resp = client.post("/v1/chat/completions", json={"model": MODEL,
                                                     "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200
    prompt_len = len(backend.calls[0][0].prompts[0])
    assert backend.calls[0][1].max_total_tokens == 64
    assert backend.calls[0][0].params.max_tokens == 64 - prompt_len


def test_chat_stream_sends_role_then_content_then_finish(api):
    client, _ = api
    resp = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    ev = events(resp)
    deltas = [e["choices"][0]["delta"] for e in ev[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert ev[-2]["choices"][0]["finish_reason"] == "length" and ev[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in ev[:-1])


def test_models_and_health(api):
    client, _ = api
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["max_model_len"] == 64


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "prompt"),                                           # missing
    ({"model": MODEL, "prompt": 5}, "prompt"),                              # wrong type
    ({"model": MODEL, "prompt": []}, "prompt"),                             # empty list
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, "logprobs"),           # not implemented
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
])
def test_invalid_completion_values_are_400(api, body, param):
    client, backend = api
    err = assert_openai_error(client.post("/v1/completions", json=body), 400, param, "invalid_value")
    assert err["message"].startswith(param)
    assert backend.calls == []   # rejected before reaching a replica


def test_invalid_chat_messages_are_400(api):
    client, _ = api
    assert_openai_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}),
                        400, "messages", "invalid_value")
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    assert_openai_error(client.post("/v1/chat/completions", json=bad_role), 400,
                        "messages.0.role", "invalid_value")


def test_malformed_json_is_400(api):
    client, _ = api
    resp = client.post("/v1/completions", content=b"{not json",
                       headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_context_length_exceeded(api):
    client, backend = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 60, "max_tokens": 10})
    err = assert_openai_error(resp, 400, "prompt", "context_length_exceeded")
    assert "maximum context length is 64 tokens" in err["message"] and "70 tokens" in err["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 80}]}
    assert_openai_error(client.post("/v1/chat/completions", json=chat), 400, "messages",
                        "context_length_exceeded")
    assert backend.calls == []


def test_unknown_model_and_routes_are_404(api):
    client, _ = api
    assert_openai_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
                        404, "model", "model_not_found")
    assert_openai_error(client.get("/v1/nothing"), 404, None, "not_found")
    assert client.get("/v1/completions").json()["error"]["type"] == "invalid_request_error"  # 405


def test_a_prompt_the_replica_refuses_is_400_streaming_or_not(api):
    client, _ = api
    body = {"model": MODEL, "prompt": [1, REFUSE], "max_tokens": 2}
    err = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert "token ids" in err["message"]
    # Streaming: refused before the first chunk, so still a 400 rather than a broken 200 stream.
    assert_openai_error(client.post("/v1/completions", json={**body, "stream": True}), 400)


def test_a_failure_mid_stream_is_reported_in_band_and_the_batch_aborted(api):
    client, backend = api
    body = {"model": MODEL, "prompt": [[1, FAIL_AFTER_FIRST], [1, HANG]], "max_tokens": 5, "stream": True}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200
    ev = events(resp)
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["type"] == "server_error"
    assert "step failed" in ev[-2]["error"]["message"]
    assert len(backend.engine.aborted) == 2


def test_python_level_validation_raises_a_typed_error():
    frontend, _ = make_frontend(max_seq_len=64)
    from replica.sampling_params import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="temperature"):
        frontend.prepare(["x"], {"temperature": -1.0})
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        frontend.prepare([], {})
    with pytest.raises(InvalidRequestError, match="non-negative integers"):
        frontend.prepare([[1, -2]], {})
    batch, hint = frontend.prepare([1, 2, 3], {"max_tokens": 4})   # one token-id prompt
    assert batch.prompts == ((1, 2, 3),) and (hint.num_sequences, hint.max_total_tokens) == (1, 7)
    long = list(range(40))
    _, hint = frontend.prepare([long, long[:20]], {"max_tokens": 2}, n=3)
    assert hint.prefix_hashes == (prefix_summary(long, 16), prefix_summary(long[:20], 16))
    assert len(hint.prefix_hashes[0]) == 2 and hint.prompt_tokens == 180 and hint.max_new_tokens == 12


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2), ("logprobs", 1), ("suffix", "x"),
                                          ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                          ("logit_bias", {"1": 1.0})])
def test_unimplemented_openai_fields_are_refused_unless_neutral(field, value):
    from pydantic import ValidationError

    from deployments.openai_schema import CompletionRequest

    with pytest.raises(ValidationError, match=f"{field} is not supported"):
        CompletionRequest(prompt="a", **{field: value})
    neutral = {"best_of": 1, "logit_bias": {}}.get(field, 0 if isinstance(value, (int, float)) else None)
    CompletionRequest(prompt="a", **{field: neutral})
