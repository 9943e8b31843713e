"""`Engine`: the public, asyncio-facing API over the step loop (contract: docs/engine-api.md).

The constructor builds the core - weights, paged KV cache, graphs - in a worker (replica/worker.py):
a child process of its own on CUDA (so the GPU loop never waits for this process's GIL), a thread
on CPU, or as `EngineConfig.engine_process` says. Each step's events come back on a background thread
and go to each request's inbox (replica/inbox.py), which wakes its consumer with one
`call_soon_threadsafe` per loop, so the event loop (a Serve replica's) never blocks on the GPU.
`generate()` turns events into `GenerationChunk`s, does detokenisation and stop strings, and aborts
its request when the consumer stops early - the slot is freed before the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import uuid
from typing import AsyncIterator

from replica.config import EngineConfig
from replica.detokenizer import IncrementalDetokenizer
from replica.sampling_params import (MIN_TOKENS_BANS, GenerationChunk, GenerationRequest, InvalidRequestError,
                                     TokenLogprob)
from replica.inbox import Inbox, deliver, fail
from replica.sequence import Event, Sequence, StepEvents
from replica.stats import EngineStats
from replica.tokenizer import load_tokenizer
from replica.process_worker import ProcessWorker
from replica.worker import OVERLOADED, EngineDeadError, EngineOverloadedError, ThreadWorker

log = logging.getLogger("replica")
__all__ = ["Engine", "EngineDeadError", "EngineOverloadedError"]


class _Request(Inbox):
    """Front-end state of one request: its inbox (replica/inbox.py), and its text."""
    __slots__ = ("prompt_tokens", "detok", "emitted_tokens", "logprobs_k", "cached_tokens")

    def __init__(self, request_id: str, loop, prompt_tokens: int, detok: IncrementalDetokenizer,
                 logprobs_k=None):
        super().__init__(request_id, loop)
        self.prompt_tokens, self.detok = prompt_tokens, detok
        self.emitted_tokens = 0
        self.logprobs_k = logprobs_k
        self.cached_tokens = 0


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_name = config.model
        self._requests: dict[str, _Request] = {}
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._stopped = False
        # The engine process starts first: its imports and capture overlap the tokenizer's load here.
        worker = ProcessWorker if _use_process(config) else ThreadWorker
        self._backend = worker(config, self._on_events, self._on_failure)
        try:
            self.tokenizer = load_tokenizer(config.model)
            self._backend.wait_ready()
        except BaseException:
            self._backend.shutdown()
            raise
        self.info = self._backend.info

    @property
    def core(self):
        """The in-process EngineCore (thread worker only; tests and debugging)."""
        return self._backend.core

    # -- public API -----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.chat_ids(messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Chunks of one request as steps produce them. Raises InvalidRequestError (bad input,
        before anything runs), EngineOverloadedError (the queue bound is reached) or
        EngineDeadError."""
        seq = self._make_sequence(request)
        state = _Request(seq.request_id, asyncio.get_running_loop(), len(seq.prompt_ids),
                         IncrementalDetokenizer(self.tokenizer, seq.params.stop, seq.params.min_tokens,
                                                context=seq.prompt_ids),
                         seq.params.logprobs)
        self._requests[seq.request_id] = state
        done = False
        try:
            self._backend.submit(seq)
            while not done:
                event = await state.next()
                if isinstance(event, BaseException):
                    raise EngineDeadError("the engine stopped while the request ran") from event
                if event.finish_reason == OVERLOADED:
                    done = True
                    raise EngineOverloadedError("the engine's queue is full; retry later")
                chunk, done = self._to_chunk(seq.request_id, state, event)
                if chunk is not None:
                    yield chunk
        except EngineOverloadedError:
            done = True
            raise
        finally:
            self._requests.pop(seq.request_id, None)
            if not done:
                self._backend.abort(seq.request_id)

    def stats(self) -> EngineStats:
        return self._backend.stats()

    def check_health(self) -> None:
        if self._stopped:
            raise EngineDeadError("the engine is shut down: step loop is not running")
        self._backend.check_health()

    def shutdown(self) -> None:
        self._stopped = True
        self._backend.shutdown()

    # -- request plumbing -----------------------------------------------------------------------
    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        if self._stopped or getattr(self._backend, "error", None) is not None:
            raise EngineDeadError("the engine is not running")
        ids = list(request.prompt_token_ids) if request.prompt_token_ids is not None \
            else self.tokenizer.encode(request.prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        limit = self.info.max_seq_len - 1
        if len(ids) > limit:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this model's maximum is {limit} "
                                      f"(max_seq_len {self.info.max_seq_len} minus one new token)",
                                      "prompt", "context_length_exceeded")
        vocab = self.info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        p = request.params
        if any(k >= vocab for k, _ in p.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        held = len(set(p.stop_token_ids)) + (0 if p.ignore_eos else self.info.num_eos_ids)
        if p.min_tokens and held > MIN_TOKENS_BANS:
            raise InvalidRequestError(f"min_tokens can hold back at most {MIN_TOKENS_BANS} stop token ids "
                                      f"(this model's EOS ids included); this request has {held}", "min_tokens")
        seed = p.seed if p.seed is not None else self._seed_rng.getrandbits(62)
        rid = request.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        return Sequence(rid, ids, p, seed)

    def _to_chunk(self, rid: str, state: _Request, event: Event):
        """Returns (chunk, finished)."""
        detok = state.detok
        detok.add(event.token_ids[:-1] if event.stopped_on_token else event.token_ids)
        final = event.finish_reason is not None
        text, matched = (detok.flush_all(), None) if final else detok.take(final=False)
        reason = event.finish_reason
        if matched is not None:  # a stop string: end here, and tell the core to free the slot
            reason = "stop"
            self._backend.abort(rid)
        state.emitted_tokens += len(event.token_ids)
        chunk = GenerationChunk(rid, event.token_ids, text, reason, prompt_tokens=state.prompt_tokens,
                                completion_tokens=state.emitted_tokens,
                                logprobs=_top_k(event.logprobs, state.logprobs_k),
                                cached_tokens=event.cached_tokens or state.cached_tokens)
        state.cached_tokens = chunk.cached_tokens
        return chunk, reason is not None

    # -- backend callbacks (a background thread) -------------------------------------------------
    def _on_events(self, events: StepEvents) -> None:
        deliver(events, self._requests)

    def _on_failure(self, error: BaseException) -> None:
        fail(error, list(self._requests.values()))


def _use_process(config: EngineConfig) -> bool:
    """Process backend for CUDA devices. Decided without importing torch, so that a front end
    running the process backend never loads it (3.5 s of import on an H200 host, and its memory):
    for `device="auto"`, CUDA counts as present when the NVIDIA driver's control device exists and
    CUDA_VISIBLE_DEVICES does not hide every GPU. A wrong guess costs speed, not correctness (the
    child resolves the device with torch); `engine_process` overrides it."""
    if config.engine_process != "auto":
        return config.engine_process == "process"
    device = (config.device or "auto").lower()
    if device != "auto":
        return device.startswith("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl")


def _top_k(logprobs, k):
    """Each token's logprob with its top-k alternatives (the engine computes the top 20)."""
    if logprobs is None or k is None:
        return None
    return tuple(TokenLogprob(lp.token_id, lp.logprob, lp.top[:k]) for lp in logprobs)
