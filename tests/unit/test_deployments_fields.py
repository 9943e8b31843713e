"""Every OpenAI request field is honoured or refused, never dropped (deployments/openai_fields.py).

The field lists come from the installed `openai` SDK's own request types (the TypedDicts of
`openai.types.completion_create_params` and `openai.types.chat.completion_create_params`) plus
vLLM's common extensions. For each field, over HTTP on a fake engine:
- honoured: a non-default value changes what reaches the engine (the batch, its SamplingParams,
  the routing hint) or what comes back (the body or the event stream);
- refused: a non-neutral value is a 400 naming the field, each neutral value passes;
- nullable (as the SDK annotates it): `null` behaves exactly like leaving the field out;
- strict types: a boolean where a number is expected, a string for a number, a number for a
  boolean are 400s naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
from fastapi.testclient import TestClient

from deployments import openai_fields as of
from deployments.http_api import build_openai_app
from deployments.openai_schema import ChatCompletionRequest, CompletionRequest
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import make_frontend

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "random:tiny"
BASE = {of.COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 3},
        of.CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
ROUTE = {of.COMPLETIONS: "/v1/completions", of.CHAT: "/v1/chat/completions"}
MODELS = {of.COMPLETIONS: CompletionRequest, of.CHAT: ChatCompletionRequest}
# vLLM's extensions graphserve names (honoured or refused) on top of OpenAI's.
VLLM_COMMON = {"top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
               "priority", "use_beam_search", "include_stop_str_in_output", "skip_special_tokens",
               "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words",
               "guided_json", "guided_regex", "guided_choice", "structured_outputs"}
VLLM_CHAT = {"add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs"}


def sdk_fields(endpoint: str) -> dict[str, str]:
    """{field: annotation text} of the SDK's request TypedDicts (streaming and not)."""
    if endpoint == of.COMPLETIONS:
        from openai.types import completion_create_params as m
    else:
        from openai.types.chat import completion_create_params as m
    out: dict[str, str] = {}
    for cls in (m.CompletionCreateParamsStreaming, m.CompletionCreateParamsNonStreaming):
        for klass in reversed(cls.__mro__):
            for name, ann in getattr(klass, "__annotations__", {}).items():
                out[name] = getattr(ann, "__forward_arg__", str(ann))
    return out


def nullable(annotation: str) -> bool:
    return not annotation.startswith("Required[") and (
        annotation.startswith("Optional[") or annotation.endswith("None]"))


# A non-default value per honoured field, with what else the request needs (`base`).
HONOURED = {
    "n": 2, "temperature": 0.5, "top_p": 0.5, "stop": ["x"], "seed": 7, "stream": True,
    "stream_options": ({"stream": True}, {"include_usage": True}), "max_tokens": 5,
    "logit_bias": {"97": 5}, "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "alice",
    "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [3],
    "min_tokens": 2,
    "prompt": "other", "messages": [{"role": "user", "content": "other"}],
    "max_completion_tokens": 5, "safety_identifier": "bob",
}
HONOURED_BY_ENDPOINT = {
    of.COMPLETIONS: {"logprobs": 2},
    of.CHAT: {"logprobs": True, "top_logprobs": ({"logprobs": True}, 3)},
}


@pytest.fixture
def api():
    frontend, backend = make_frontend(max_seq_len=64, vocab_size=259, max_sequences=8)
    with TestClient(build_openai_app(frontend)) as client:
        yield client, backend


def observe(api, endpoint: str, body: dict):
    """(status, what the engine was asked, what came back), ids and timestamps left out."""
    client, backend = api
    backend.calls.clear()
    resp = client.post(ROUTE[endpoint], json=body)
    sent = [(b.prompts, b.n, b.user, dataclasses.asdict(b.params), h) for b, h in backend.calls]
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        got = [_strip(json.loads(e[6:])) if e[6:] != "[DONE]" else e for e in resp.text.split("\n\n") if e]
    else:
        got = _strip(resp.json())
    return resp.status_code, sent, got


def _strip(body):
    return {k: v for k, v in body.items() if k not in ("id", "created")} if isinstance(body, dict) else body


@pytest.mark.parametrize("endpoint", [of.COMPLETIONS, of.CHAT])
def test_every_sdk_and_vllm_field_has_a_policy_and_nothing_else_is_accepted(endpoint):
    table = of.fields_for(endpoint)
    vllm = VLLM_COMMON | (VLLM_CHAT if endpoint == of.CHAT else set())
    missing = (set(sdk_fields(endpoint)) | vllm) - set(table)
    assert not missing, f"fields without a policy: {sorted(missing)}"
    # The request model declares exactly the table's fields (unknown ones are refused by extra=forbid).
    assert set(MODELS[endpoint].model_fields) == set(table)
    assert MODELS[endpoint].model_config["extra"] == "forbid"


@pytest.mark.parametrize("endpoint", [of.COMPLETIONS, of.CHAT])
def test_each_honoured_field_changes_what_is_sent_or_returned(api, endpoint):
    base_status, *base = observe(api, endpoint, BASE[endpoint])
    assert base_status == 200
    samples = {**HONOURED, **HONOURED_BY_ENDPOINT[endpoint]}
    checked = []
    for name, policy in of.fields_for(endpoint).items():
        if not policy.honoured or name == "model":
            continue
        extra, value = samples[name] if isinstance(samples[name], tuple) else ({}, samples[name])
        before = observe(api, endpoint, {**BASE[endpoint], **extra}) if extra else (200, *base)
        status, *after = observe(api, endpoint, {**BASE[endpoint], **extra, name: value})
        assert status == 200, (name, after)
        assert after != list(before[1:]), f"{name}={value!r} changed nothing"
        checked.append(name)
    assert len(checked) == sum(p.honoured for p in of.fields_for(endpoint).values()) - 1
    # `model` is honoured by checking it: the served name passes, any other is a 404.
    client, _ = api
    assert client.post(ROUTE[endpoint], json={**BASE[endpoint], "model": "gpt-x"}).status_code == 404


@pytest.mark.parametrize("endpoint", [of.COMPLETIONS, of.CHAT])
def test_each_refused_field_is_a_400_naming_it_and_its_neutral_values_pass(api, endpoint):
    client, backend = api
    for name, policy in of.refused_for(endpoint).items():
        resp = client.post(ROUTE[endpoint], json={**BASE[endpoint], name: {"unsupported": 1}})
        assert resp.status_code == 400, (name, resp.text)
        err = resp.json()["error"]
        assert err["param"] == name and name in err["message"], err
        assert err["type"] == "invalid_request_error"
        for value in policy.neutral_values:
            ok = client.post(ROUTE[endpoint], json={**BASE[endpoint], name: value})
            assert ok.status_code == 200, (name, value, ok.text)


@pytest.mark.parametrize("endpoint", [of.COMPLETIONS, of.CHAT])
def test_documented_nullables_accept_null_as_the_default(api, endpoint):
    base = observe(api, endpoint, BASE[endpoint])
    nullables = [n for n, a in sdk_fields(endpoint).items() if nullable(a)]
    nullables += [n for n, p in of.fields_for(endpoint).items() if p.origin == "vllm"]
    assert {"temperature", "top_p", "n", "max_tokens", "stop", "seed", "logprobs"} <= set(nullables)
    for name in nullables:
        body = {**BASE[endpoint], name: None}
        if name == "max_tokens":   # leaving it out is the default too
            assert observe(api, endpoint, body)[0] == 200
            continue
        assert observe(api, endpoint, body) == base, name


STRICT = [("max_tokens", True), ("n", True), ("seed", True), ("top_k", True), ("temperature", True),
          ("temperature", "0.5"), ("top_p", True), ("presence_penalty", False), ("min_p", "0.1"),
          ("repetition_penalty", True), ("stream", 1), ("ignore_eos", 0), ("max_tokens", 2.0),
          ("stop", 5), ("user", 5), ("logit_bias", {"97": True}), ("stop_token_ids", [True]),
          ("min_tokens", True), ("min_tokens", 1.0)]


@pytest.mark.parametrize("endpoint", [of.COMPLETIONS, of.CHAT])
@pytest.mark.parametrize("name, value", STRICT)
def test_types_are_strict(api, endpoint, name, value):
    client, backend = api
    resp = client.post(ROUTE[endpoint], json={**BASE[endpoint], name: value})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].split(".")[0] == name
    assert backend.calls == []


def test_endpoint_specific_strict_types(api):
    client, _ = api
    for route, body, param in [
            ("/v1/completions", {**BASE[of.COMPLETIONS], "logprobs": True}, "logprobs"),
            ("/v1/chat/completions", {**BASE[of.CHAT], "logprobs": 1}, "logprobs"),
            ("/v1/chat/completions", {**BASE[of.CHAT], "logprobs": True, "top_logprobs": True},
             "top_logprobs"),
            ("/v1/chat/completions", {**BASE[of.CHAT], "top_logprobs": 2}, "top_logprobs")]:
        resp = client.post(route, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_docs_page_lists_every_field_and_is_current():
    page = (ROOT / "docs" / "openai-fields.md").read_text()
    assert page == of.render_markdown(), "run: python -m deployments.openai_fields > docs/openai-fields.md"
    for f in of.FIELDS:
        assert f"| `{f.name}` |" in page
