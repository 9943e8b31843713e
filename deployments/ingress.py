"""`OpenAIIngress`: the app's entry deployment, for HTTP clients and for other Ray jobs.

- HTTP: the OpenAI-compatible FastAPI app of `deployments.http_api`, built at replica start
  (`__serve_build_asgi_app__`) around this replica's `Frontend`.
- Python: `generate(prompts, **sampling) -> BatchResult` and `stream(prompts, **sampling)` (an
  async generator of `list[StreamChunk]`; call it with `handle.options(stream=True)`). A request
  batch - a list of prompts, text or token ids - is the unit. Bad input raises
  `replica.InvalidRequestError` (over a handle: `RayTaskError(InvalidRequestError)`, still an
  `InvalidRequestError`; the clean message is `.cause`).

Either way the ingress tokenizes (the tokenizer is loaded without weights), checks lengths, and
calls `LLMReplica` through a deployment handle with `routing_hint=RoutingHint(...)`. The
bucket-aware router therefore runs here, in the ingress replica, and sees the batch's shape.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Sequence

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.frontend import Frontend, PromptInput
from deployments.http_api import build_openai_app
from deployments.protocol import BatchResult, PromptBatch, StreamChunk
from replica.tokenizer import load_tokenizer
from router.stats import RoutingHint


class ReplicaBackend:
    """Runs prepared batches on the LLMReplica deployment (the `Frontend`'s backend)."""

    def __init__(self, handle: DeploymentHandle):
        self._generate = handle.options(method_name="generate")
        self._stream = handle.options(method_name="stream", stream=True)

    async def generate(self, batch: PromptBatch, hint: RoutingHint) -> BatchResult:
        return await self._generate.remote(batch, routing_hint=hint)

    async def stream(self, batch: PromptBatch, hint: RoutingHint) -> AsyncIterator[list[StreamChunk]]:
        response = self._stream.remote(batch, routing_hint=hint)
        finished = False
        try:
            async for chunks in response:
                yield chunks
            finished = True
        finally:
            if not finished:   # the caller stopped reading: abort the batch on the replica
                response.cancel()


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress:
    def __init__(self, replica: DeploymentHandle, args: AppArgs):
        self._frontend = Frontend(load_tokenizer(args.model), args.model_name, args.max_seq_len,
                                  ReplicaBackend(replica), block_size=args.block_size)

    def __serve_build_asgi_app__(self):
        return build_openai_app(self._frontend)

    async def generate(self, prompts: Sequence[PromptInput], *, max_tokens: int = 16,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       stop: Sequence[str] = (), seed: Optional[int] = None, n: int = 1,
                       ignore_eos: bool = False) -> BatchResult:
        batch, hint = self._frontend.prepare(prompts, _params(locals()), n=n)
        return await self._frontend.generate(batch, hint)

    async def stream(self, prompts: Sequence[PromptInput], *, max_tokens: int = 16,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     stop: Sequence[str] = (), seed: Optional[int] = None, n: int = 1,
                     ignore_eos: bool = False) -> AsyncIterator[list[StreamChunk]]:
        batch, hint = self._frontend.prepare(prompts, _params(locals()), n=n)
        async with aclosing(self._frontend.stream(batch, hint)) as stream:
            async for chunks in stream:
                yield chunks


def _params(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                               "ignore_eos")}
