"""The OpenAI HTTP API without Ray: FastAPI's TestClient on `build_openai_app`, with a Frontend
whose backend runs batches on a FakeEngine in-process. Checks the wire format, SSE streaming, the
routing hint, and that every bad input is a 4xx in OpenAI's error format."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.http_api import build_openai_app
from replica.block_hash import prefix_summary
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import FAIL_AFTER_FIRST, HANG, REFUSE, make_frontend

MODEL = "random:tiny"


USAGE_DETAILS = {"prompt_tokens_details": {"cached_tokens": 0}}


@pytest.fixture
def api():
    frontend, backend = make_frontend(max_seq_len=64, vocab_size=259, max_sequences=8)
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
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19,
                             **USAGE_DETAILS}
    # The router sees the batch's shape: 4 sequences, the longest needing 5 + 3 positions.
    (batch, hint), = backend.calls
    assert (hint.num_sequences, hint.max_total_tokens) == (4, 8)
    assert (hint.prompt_tokens, hint.max_new_tokens, hint.samples_per_prompt) == (14, 12, 2)
    assert hint.prefix_hashes == ((), ())      # prompts shorter than one block have no full block
    assert batch.prompts == (tuple(b"hi"), tuple(b"hello")) and batch.params.temperature == 0


def test_token_id_prompts(api):
    client, backend = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert backend.calls[0][0].prompts == ((1, 2, 3),)


def test_unknown_fields_are_refused_by_name(api):
    client, backend = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                "some_future_field": {"x": 1}})
    err = assert_openai_error(resp, 400, "some_future_field", "unknown_parameter")
    assert err["message"] == "Unrecognized request argument supplied: some_future_field"
    assert backend.calls == []


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
    assert ev[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                               **USAGE_DETAILS}


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
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),                # not implemented
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
    # A generic message: the exception's text (which may carry internals) stays in the log.
    assert "step failed" not in ev[-2]["error"]["message"] and ev[-2]["error"]["code"] == "internal_error"
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
    with pytest.raises(InvalidRequestError, match="n must be a positive integer"):
        frontend.prepare(["x"], {}, n=True)
    batch, hint = frontend.prepare([1, 2, 3], {"max_tokens": 4})   # one token-id prompt
    assert batch.prompts == ((1, 2, 3),) and (hint.num_sequences, hint.max_total_tokens) == (1, 7)
    long = list(range(40))
    _, hint = frontend.prepare([long, long[:20]], {"max_tokens": 2}, n=3)
    assert hint.prefix_hashes == (prefix_summary(long, 16), prefix_summary(long[:20], 16))
    assert len(hint.prefix_hashes[0]) == 2 and hint.prompt_tokens == 180 and hint.max_new_tokens == 12


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2), ("suffix", "x"),
                                          ("tools", [{"type": "function"}])])
def test_unimplemented_openai_fields_are_refused_unless_neutral(field, value):
    from pydantic import ValidationError

    from deployments.openai_schema import ChatCompletionRequest, CompletionRequest

    model, base = ((ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}]})
                   if field == "tools" else (CompletionRequest, {"prompt": "a"}))
    with pytest.raises(ValidationError, match=f"{field} is not supported"):
        model(**base, **{field: value})
    neutral = {"best_of": 1, "suffix": "", "tools": []}.get(field, False)
    model(**base, **{field: neutral})
    model(**base, **{field: None})


# ---- sampling extras, logprobs and usage details ---------------------------------------------

def test_sampling_extras_reach_the_engine(api):
    client, backend = api
    resp = client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hi", "max_tokens": 2, "min_p": 0.1, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.3, "logit_bias": {"97": 100, "3": -5},
        "stop_token_ids": [7], "top_k": -1, "logprobs": 0, "user": "u1", "min_tokens": 1})
    assert resp.status_code == 200, resp.text
    batch, _ = backend.calls[0]
    p = batch.params
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.1, 0.5, -0.5, 1.3)
    assert p.logit_bias == ((3, -5.0), (97, 100.0)) and p.stop_token_ids == (7,)
    assert p.top_k == 0 and p.logprobs == 0 and batch.user == "u1" and p.min_tokens == 1
    # ... and the engine received them on every sequence.
    assert all(r.params == p for r in backend.engine.requests)


def test_completion_logprobs_in_openai_format(api):
    client, _ = api
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                 "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["text_offset"] == [0, 1]
    # k alternatives plus the chosen token (OpenAI: up to logprobs + 1 entries).
    assert lp["top_logprobs"] == [{"b": -1.0, "c": -2.0, "a": -0.5}, {"c": -1.0, "d": -2.0, "b": -0.5}]


def test_completion_logprobs_stream_per_chunk_with_running_offsets(api):
    client, _ = api
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                                "logprobs": 1, "stream": True})
    chunks = [e for e in events(resp)[:-1] if e["choices"]]
    lps = [c["choices"][0]["logprobs"] for c in chunks]
    assert [x["tokens"] for x in lps] == [["a"], ["b"], ["c"]]
    assert [x["text_offset"] for x in lps] == [[0], [1], [2]]
    assert lps[0]["top_logprobs"] == [{"b": -1.0, "a": -0.5}]


def test_chat_logprobs_in_openai_format_streaming_or_not(api):
    client, _ = api
    req = {"model": MODEL, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
           "messages": [{"role": "user", "content": "hi"}]}
    content = client.post("/v1/chat/completions", json=req).json()["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "a", "logprob": -0.5, "bytes": [97],
                          "top_logprobs": [{"token": "b", "logprob": -1.0, "bytes": [98]}]}
    assert [c["token"] for c in content] == ["a", "b"]
    ev = events(client.post("/v1/chat/completions", json={**req, "stream": True}))
    streamed = [e["choices"][0]["logprobs"] for e in ev[:-1] if e["choices"][0]["logprobs"]]
    assert [x["content"] for x in streamed] == [[content[0]], [content[1]]]
    # Without logprobs: null, as OpenAI sends it.
    plain = client.post("/v1/chat/completions", json={**req, "logprobs": False, "top_logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_cached_prompt_tokens_are_reported_in_usage():
    frontend, backend = make_frontend(max_seq_len=64, cached_tokens=2)
    with TestClient(build_openai_app(frontend)) as client:
        body = client.post("/v1/completions", json={"prompt": ["abc", "de"], "n": 2,
                                                     "max_tokens": 1}).json()
        # Per prompt once (not per sample), like prompt_tokens.
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
        ev = events(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True}}))
        assert ev[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


# ---- input the ingress refuses itself --------------------------------------------------------

@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\udfffb"]}, "prompt.1"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop.0"),
    ("/v1/completions", {"prompt": "x", "user": "\ud83d"}, "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages.0.content.0.text"),
])
def test_lone_surrogates_are_400_not_500(api, route, body, param):
    client, backend = api
    # json.dumps escapes the surrogate as \\ud800, the way a client's JSON carries it.
    resp = client.post(route, content=json.dumps({"model": MODEL, **body}),
                       headers={"Content-Type": "application/json"})
    err = assert_openai_error(resp, 400, param, "invalid_value")
    assert "surrogate" in err["message"] and backend.calls == []


def test_surrogates_in_the_python_api_are_refused_too():
    frontend, _ = make_frontend()
    from replica.sampling_params import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="surrogate"):
        frontend.prepare(["a\ud800"], {})
    with pytest.raises(InvalidRequestError, match="surrogate"):
        frontend.prepare_chat([[{"role": "user", "content": "\ud800"}]], {})


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 259]}, "prompt"),                                     # vocab is 259
    ({"prompt": "x", "logit_bias": {"300": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"x1": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [1000]}, "stop_token_ids"),
    ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "n": 9}, "n"),                                       # capacity is 8
    ({"prompt": ["x"] * 9}, "prompt"),
    ({"prompt": ["x"] * 3, "n": 3}, "n"),
    ({"prompt": "x", "n": 129}, "n"),                                     # OpenAI's limit
    ({"prompt": "x", "seed": 2**63}, "seed"),
    ({"prompt": "x", "stop": ["s"] * 10_000}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
])
def test_values_beyond_the_models_limits_are_400_naming_the_field(api, body, param):
    client, backend = api
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL, **body}), 400, param,
                        "invalid_value")
    assert backend.calls == []


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x", "tool_call_id": "1"}, "messages.0.role"),
    ({"role": "user", "content": "x", "name": "bob"}, "messages.0.name"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "messages.0.tool_calls"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "messages.0.content.0.type"),
    ({"role": "user", "content": "x", "cache_control": {}}, "messages.0.cache_control"),
])
def test_message_fields_we_cannot_honour_are_refused(api, message, param):
    client, _ = api
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [message]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_a_bad_body_never_becomes_a_500(api):
    client, _ = api
    cases = [b"[" * 100_000 + b"]" * 100_000,                       # nesting past the JSON parser's limit
             b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",      # past Python's int-parsing limit
             b'{"prompt": "x", "temperature": NaN}', b"\xff\xfe", b"", b"null", b"[]"]
    for raw in cases:
        resp = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (raw[:30], resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
