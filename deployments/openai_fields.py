"""Every request field graphserve knows, and what it does with it: the one table behind the rule
"honour a field, or refuse it with a 400 that names it".

Contract:
- `FIELDS` lists each top-level field of `/v1/completions` and `/v1/chat/completions`: every field
  of the `openai` SDK's request types (a test reads them from the installed SDK) and vLLM's common
  extensions. A field is either *honoured* (it changes what the engine runs or what comes back) or
  *refused*: then only its neutral values pass (the ones that ask for nothing, e.g. `echo: false`),
  and anything else is a 400 with `param` set to the field.
- A field in no list is refused too (`Unrecognized request argument supplied: <name>`, as OpenAI
  answers), so a client never silently gets something other than what it asked for.
- `null` is accepted wherever OpenAI documents the field as nullable, and means the default.
- `openai_schema` builds its request models from this table (refused fields are checked with
  `neutral`); `python -m deployments.openai_fields` prints docs/openai-fields.md (a test keeps the
  committed page current).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

COMPLETIONS, CHAT = "completions", "chat"
BOTH = (COMPLETIONS, CHAT)


@dataclass(frozen=True)
class FieldPolicy:
    name: str
    endpoints: tuple[str, ...]
    origin: str                      # "openai" or "vllm" (an extension vLLM's server accepts)
    honoured: bool
    note: str                        # what it does, or why it is refused
    neutral_values: tuple = ()       # refused fields: the values that pass (they ask for nothing)

    def accepts(self, value: Any) -> bool:
        return self.honoured or any(_same(value, x) for x in self.neutral_values)

    @property
    def neutral_doc(self) -> str:
        return ", ".join(json.dumps(v) for v in self.neutral_values)


def _h(name, endpoints, note, origin="openai") -> FieldPolicy:
    return FieldPolicy(name, endpoints, origin, True, note)


def _r(name, endpoints, note, neutral_values=(None,), origin="openai") -> FieldPolicy:
    return FieldPolicy(name, endpoints, origin, False, note, tuple(neutral_values))


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps JSON types apart (`true` is not `1`, `0` is not `false`)."""
    return (a is None and b is None) or (type(a) is type(b) and a == b)


NO_TOOLS = "tools and structured output are not implemented yet (a later issue)"
FIELDS: tuple[FieldPolicy, ...] = (
    # -- both endpoints (OpenAI) --
    _h("model", BOTH, "must name the served model (or be omitted); another name is a 404"),
    _h("n", BOTH, "samples per prompt, 1-128; a request may hold at most the replica's capacity in "
                  "sequences (prompts x n)"),
    _h("temperature", BOTH, "0-2; 0 is greedy"),
    _h("top_p", BOTH, "(0, 1]"),
    _h("stop", BOTH, "up to 4 non-empty strings; the text ends before the first match"),
    _h("seed", BOTH, "[0, 2**63); sample j of a prompt uses seed + j"),
    _h("stream", BOTH, "server-sent events in OpenAI's chunk format, ending with `data: [DONE]`"),
    _h("stream_options", BOTH, "`include_usage` adds a last chunk with `usage`; only with "
                               "`stream: true`; `include_obfuscation: true` is refused"),
    _h("max_tokens", BOTH, "positive; prompt + max_tokens must fit the context (completions "
                           "default 16, chat default: the rest of the context)"),
    _h("logprobs", BOTH, "completions: 0-20 alternatives per token; chat: true/false (with "
                         "`top_logprobs`); raw model log-probabilities, streaming included; a "
                         "token's text and bytes are what it adds to the text (its leading space; "
                         "a partial character's own bytes)"),
    _h("logit_bias", BOTH, "{token id: bias in [-100, 100]}, at most 300 entries"),
    _h("presence_penalty", BOTH, "[-2, 2]"),
    _h("frequency_penalty", BOTH, "[-2, 2]"),
    _h("user", BOTH, "the end user's id: kept on the batch (`PromptBatch.user`) and written in the "
                     "log lines about the request"),
    # -- /v1/completions only (OpenAI) --
    _h("prompt", (COMPLETIONS,), "a string, a list of strings, a list of token ids, or a list of "
                                 "token-id lists (one batch)"),
    _r("best_of", (COMPLETIONS,), "server-side best-of selection is not implemented", (None, 1)),
    _r("echo", (COMPLETIONS,), "echoing the prompt is not implemented", (None, False)),
    _r("suffix", (COMPLETIONS,), "insertion (text after the completion) is not implemented",
       (None, "")),
    # -- /v1/chat/completions only (OpenAI) --
    _h("messages", (CHAT,), "roles system, developer, user, assistant; text content (a string or "
                            "text parts); the model's chat template builds the prompt"),
    _h("max_completion_tokens", (CHAT,), "like `max_tokens`; wins when both are given"),
    _h("top_logprobs", (CHAT,), "0-20 alternatives per token; needs `logprobs: true`"),
    _h("safety_identifier", (CHAT,), "like `user` (which wins when both are given)"),
    _r("response_format", (CHAT,), NO_TOOLS, (None, {"type": "text"})),
    _r("tools", (CHAT,), NO_TOOLS, (None, [])),
    _r("tool_choice", (CHAT,), NO_TOOLS, (None, "none")),
    _r("parallel_tool_calls", (CHAT,), NO_TOOLS),
    _r("functions", (CHAT,), NO_TOOLS, (None, [])),
    _r("function_call", (CHAT,), NO_TOOLS, (None, "none")),
    _r("audio", (CHAT,), "audio output is not supported"),
    _r("modalities", (CHAT,), "only text output is supported", (None, ["text"])),
    _r("prediction", (CHAT,), "predicted outputs are not implemented"),
    _r("metadata", (CHAT,), "completions are not stored", (None, {})),
    _r("store", (CHAT,), "completions are not stored", (None, False)),
    _r("service_tier", (CHAT,), "there is one service tier", (None, "auto", "default")),
    _r("reasoning_effort", (CHAT,), "not a reasoning model"),
    _r("verbosity", (CHAT,), "not supported"),
    _r("web_search_options", (CHAT,), "web search is not available"),
    _r("prompt_cache_key", (CHAT,), "the router places requests by prefix itself; no cache keys"),
    _r("prompt_cache_retention", (CHAT,), "cache retention is not configurable"),
    _r("prompt_cache_options", (CHAT,), "cache options are not configurable"),
    _r("moderation", (CHAT,), "no moderation is run"),
    # -- vLLM's extensions (both endpoints) --
    _h("top_k", BOTH, "keep the k most likely tokens; 0 or -1 disables", "vllm"),
    _h("min_p", BOTH, "[0, 1]: drop tokens below min_p x the top token's probability", "vllm"),
    _h("repetition_penalty", BOTH, "(0, 2]; 1 is off (prompt and output tokens)", "vllm"),
    _h("ignore_eos", BOTH, "generate max_tokens even past the end-of-sequence token", "vllm"),
    _h("stop_token_ids", BOTH, "up to 64 token ids that end the sequence", "vllm"),
    _h("min_tokens", BOTH, "no EOS, stop token or stop string before this many tokens", "vllm"),
    _r("priority", BOTH, "requests are not prioritised", (None, 0), "vllm"),
    _r("use_beam_search", BOTH, "beam search is not implemented", (None, False), "vllm"),
    _r("length_penalty", BOTH, "beam search is not implemented", (None, 1, 1.0), "vllm"),
    _r("include_stop_str_in_output", BOTH, "the text always ends before the stop string",
       (None, False), "vllm"),
    _r("skip_special_tokens", BOTH, "special tokens are always skipped", (None, True), "vllm"),
    _r("spaces_between_special_tokens", BOTH, "special tokens are always skipped", (None, True),
       "vllm"),
    _r("truncate_prompt_tokens", BOTH, "prompts are never truncated: too long is a 400",
       origin="vllm"),
    _r("prompt_logprobs", BOTH, "prompt log-probabilities are not computed", origin="vllm"),
    _r("allowed_token_ids", BOTH, "not implemented (use logit_bias)", origin="vllm"),
    _r("bad_words", BOTH, "not implemented (use logit_bias)", (None, []), "vllm"),
    _r("guided_json", BOTH, NO_TOOLS, origin="vllm"),
    _r("guided_regex", BOTH, NO_TOOLS, origin="vllm"),
    _r("guided_choice", BOTH, NO_TOOLS, origin="vllm"),
    _r("guided_grammar", BOTH, NO_TOOLS, origin="vllm"),
    _r("structured_outputs", BOTH, NO_TOOLS, origin="vllm"),
    _r("return_tokens_as_token_ids", BOTH, "not implemented", (None, False), "vllm"),
    _r("request_id", BOTH, "the server assigns request ids", origin="vllm"),
    # -- vLLM's chat extensions --
    _r("add_generation_prompt", (CHAT,), "the assistant turn is always opened", (None, True), "vllm"),
    _r("continue_final_message", (CHAT,), "not implemented", (None, False), "vllm"),
    _r("chat_template", (CHAT,), "the model's own template is used", origin="vllm"),
    _r("chat_template_kwargs", (CHAT,), "the model's own template is used", (None, {}), "vllm"),
    _r("echo", (CHAT,), "echoing the last message is not implemented", (None, False), "vllm"),
)


def fields_for(endpoint: str) -> dict[str, FieldPolicy]:
    return {f.name: f for f in FIELDS if endpoint in f.endpoints}


def refused_for(endpoint: str) -> dict[str, FieldPolicy]:
    return {n: f for n, f in fields_for(endpoint).items() if not f.honoured}


def render_markdown() -> str:
    """docs/openai-fields.md."""
    lines = ["# OpenAI request fields: honoured or refused",
             "",
             "Generated by `python -m deployments.openai_fields > docs/openai-fields.md` from "
             "`deployments/openai_fields.py` (a test keeps this page current, and another checks the "
             "list against the installed `openai` SDK's request types).",
             "",
             "- **honoured**: the field changes what the engine runs or what the response holds.",
             "- **refused**: only the listed neutral values pass; any other value is a 400 in "
             "OpenAI's error format with `param` set to the field.",
             "- A field in neither list is a 400 too (`Unrecognized request argument supplied: "
             "<name>`, `code: unknown_parameter`), as OpenAI answers; nothing is silently dropped.",
             "- `null` means the default wherever OpenAI documents the field as nullable. Types are "
             "strict: `true` is not an integer, `\"1\"` is not a number.",
             ""]
    for endpoint, title in ((COMPLETIONS, "POST /v1/completions"), (CHAT, "POST /v1/chat/completions")):
        fields = fields_for(endpoint)
        honoured = sum(f.honoured for f in fields.values())
        lines += [f"## {title}", "",
                  f"{honoured} honoured, {len(fields) - honoured} refused.", "",
                  "| field | origin | status | accepted when refused | notes |",
                  "|---|---|---|---|---|"]
        for f in sorted(fields.values(), key=lambda f: (f.origin != "openai", not f.honoured, f.name)):
            status = "honoured" if f.honoured else "refused"
            lines.append(f"| `{f.name}` | {f.origin} | {status} | {f.neutral_doc} | {f.note} |")
        lines.append("")
    lines += ["## Nested fields", "",
              "- `stream_options`: `include_usage` is honoured; `include_obfuscation` and vLLM's "
              "`continuous_usage_stats` accept only false/null; other keys are a 400.",
              "- `messages[i]`: `role` (system, developer, user, assistant) and `content` (a string, "
              "null, or a list of `{\"type\": \"text\", \"text\": ...}` parts) are honoured. `name`, "
              "`tool_calls`, `tool_call_id`, `function_call` and `audio` accept only null (or an empty "
              "list); roles `tool` and `function`, non-text parts and other keys are a 400 naming the "
              "path (e.g. `messages.1.content.0.type`).",
              "- Strings must be valid Unicode: a lone surrogate (`\"\\ud800\"`) is a 400 naming the "
              "field.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
