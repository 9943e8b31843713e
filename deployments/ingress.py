"""`OpenAIIngress`: the app's entry deployment, for HTTP clients and for other Ray jobs.

- HTTP: the OpenAI-compatible FastAPI app of `deployments.http_api`, built at replica start
  (`__serve_build_asgi_app__`) around this replica's `Frontend`, with the API keys of
  `deployments.http_guard` (from `GRAPHSERVE_API_KEYS` / `AppArgs.api_keys_file`) and the body
  limit `AppArgs.max_request_bytes`.
- Python: `generate(prompts, **sampling) -> BatchResult` and `stream(prompts, **sampling)` (an
  async generator of `list[StreamChunk]`; call it with `handle.options(stream=True)`). A request
  batch - a list of prompts, text or token ids - is the unit. Errors are typed: bad input raises
  `replica.InvalidRequestError` (over a handle: `RayTaskError(InvalidRequestError)`, still an
  `InvalidRequestError`; the clean message is `.cause`), a full replica `ServerOverloadedError`,
  no ready replica `NoReplicaError`, a replica that died mid-request `ReplicaFailedError`
  (all in `deployments.errors`).

Either way the ingress tokenizes (the tokenizer is loaded without weights), checks lengths, token
ids and batch size, and calls `LLMReplica` through a deployment handle with
`routing_hint=RoutingHint(...)`, so the bucket-aware router runs here and sees the batch's shape.
A call waits for a replica at most `AppArgs.replica_wait_s` while none is running
(`deployments.replica_watch`).

Placement: the ingress asks for `AppArgs.ingress_num_cpus` (> 0) CPUs. A KubeRay head offers none
(`num-cpus: "0"`), so the ingress always lands on a worker pod, where the model volume is mounted
(it loads the tokenizer from `args.model`).
"""
from __future__ import annotations

import logging
import os
from contextlib import aclosing
from functools import partial
from typing import Any, AsyncIterator, Optional, Sequence, Union

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.errors import REPLICA_FAILED, describe, install_log_filter
from deployments.frontend import Frontend, PromptInput, model_vocab_size
from deployments.http_api import build_openai_app
from deployments.http_guard import ApiKeys
from deployments.protocol import BatchResult, PromptBatch, StreamChunk
from deployments.replica_watch import ReplicaWatch, running_replicas
from replica.tokenizer import load_tokenizer
from router.stats import RoutingHint

log = logging.getLogger("ray.serve")


class ReplicaFailedError(RuntimeError):
    """The replica running this request died before it finished (Python API)."""


class ReplicaBackend:
    """Runs prepared batches on the LLMReplica deployment (the `Frontend`'s backend)."""

    def __init__(self, handle: DeploymentHandle, watch: ReplicaWatch):
        self._generate = handle.options(method_name="generate")
        self._stream = handle.options(method_name="stream", stream=True)
        self._watch = watch

    async def ready(self) -> bool:
        return await self._watch.ready()

    async def generate(self, batch: PromptBatch, hint: RoutingHint) -> BatchResult:
        response = self._generate.remote(batch, routing_hint=hint)
        try:
            return await self._watch.bounded(_await(response))
        except BaseException:
            response.cancel()
            raise

    async def stream(self, batch: PromptBatch, hint: RoutingHint) -> AsyncIterator[list[StreamChunk]]:
        response = self._stream.remote(batch, routing_hint=hint)
        finished = False
        try:
            it = response.__aiter__()
            yield await self._watch.bounded(it.__anext__())   # waits for a replica (bounded)
            async for chunks in it:
                yield chunks
            finished = True
        except StopAsyncIteration:
            finished = True
        finally:
            if not finished:   # failed, or the caller stopped reading: abort the batch
                response.cancel()


async def _await(response) -> Any:
    return await response


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class OpenAIIngress:
    def __init__(self, replica: DeploymentHandle, args: AppArgs):
        install_log_filter()
        app_name = serve.get_replica_context().app_name
        watch = ReplicaWatch(partial(running_replicas, app_name, "LLMReplica"), args.replica_wait_s,
                             retry_after_s=args.retry_after_s)
        self._keys = ApiKeys.from_sources(args.api_keys_file)   # a bad key file fails startup
        self._max_body = args.max_request_bytes
        self._frontend = Frontend(load_tokenizer(args.model), args.model_name, args.max_seq_len,
                                  ReplicaBackend(replica, watch),
                                  vocab_size=model_vocab_size(args.model),
                                  max_sequences=args.max_sequences_per_request or args.replica_capacity(),
                                  block_size=args.block_size)
        log.info("OpenAIIngress: %s, API keys %s, body limit %d bytes, replica wait %.1f s",
                 args.model_name, "on" if self._keys.enabled else "off", self._max_body,
                 args.replica_wait_s)

    def counters(self) -> dict[str, Any]:
        """This ingress replica's own timing (Frontend.latency): for benchmarks and debugging
        (`handle.broadcast("counters")`)."""
        return {"pid": os.getpid(), **self._frontend.latency()}

    def __serve_build_asgi_app__(self):
        return build_openai_app(self._frontend, api_keys=self._keys, max_body_bytes=self._max_body)

    async def generate(self, prompts: Sequence[PromptInput], *, max_tokens: int = 16, min_tokens: int = 0,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       min_p: float = 0.0, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), seed: Optional[int] = None, n: int = 1,
                       ignore_eos: bool = False, logprobs: Optional[int] = None,
                       presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                       repetition_penalty: float = 1.0,
                       logit_bias: Union[dict, Sequence] = ()) -> BatchResult:
        batch, hint = self._frontend.prepare(prompts, _params(locals()), n=n)
        try:
            return await self._frontend.generate(batch, hint)
        except Exception as e:
            raise _for_python(e) from None

    async def stream(self, prompts: Sequence[PromptInput], *, max_tokens: int = 16, min_tokens: int = 0,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     min_p: float = 0.0, stop: Sequence[str] = (),
                     stop_token_ids: Sequence[int] = (), seed: Optional[int] = None, n: int = 1,
                     ignore_eos: bool = False, logprobs: Optional[int] = None,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0,
                     logit_bias: Union[dict, Sequence] = ()) -> AsyncIterator[list[StreamChunk]]:
        batch, hint = self._frontend.prepare(prompts, _params(locals()), n=n)
        try:
            async with aclosing(self._frontend.stream(batch, hint)) as stream:
                async for chunks in stream:
                    yield chunks
        except Exception as e:
            raise _for_python(e) from None


_SAMPLING = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
             "seed", "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "logit_bias")


def _params(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in _SAMPLING}


def _for_python(e: Exception) -> Exception:
    """The typed error a handle caller gets: Ray's replica-death errors become ReplicaFailedError
    (no actor ids or addresses); the rest is raised as it came (its cause, when Ray wrapped it)."""
    err = describe(e)
    if err.code == "replica_failed":
        return ReplicaFailedError(REPLICA_FAILED)
    return getattr(e, "cause", None) or e
