"""Fakes for the router unit tests: replicas, a clock, requests, and the no-Ray guard.

`FakeRunningReplica` subclasses Ray's `RunningReplica` (like Ray's own pow-2 router tests) but
skips its constructor, which wants an actor handle; it answers queue-length probes from a field.
Import the fixtures `no_ray_init` (autouse: the no-Ray guard) and `current_loop` into a test
module to use them there (pytest picks up imported fixtures), keeping the shared conftest.py clean.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import random
from typing import Any, Optional

import pytest
import ray
from ray.serve._private.common import (DeploymentHandleSource, DeploymentID, ReplicaID,
                                       RequestMetadata)
from ray.serve.request_router import PendingRequest, RunningReplica

from replica.block_hash import prefix_summary
from router.policy import OUTCOMES, rank_replicas
from router.stats import ReplicaStats, RoutingHint

BLOCK = 16  # tokens per KV block in the fakes
DEPLOYMENT = DeploymentID(name="Decoder", app_name="llm")
NOW = 1_000_000.0  # the fake wall clock's start; stats default to this timestamp
STALE = 10.0       # stale_after_s of the policy tests
_request_ids = itertools.count()


@pytest.fixture(autouse=True)
def no_ray_init(monkeypatch):
    """Unit tests must not start Ray: `ray.init` raises, and Ray must be down after each test."""
    def refuse(*args, **kwargs):
        raise RuntimeError("Unit tests should not depend on Ray being initialized.")

    monkeypatch.setattr(ray, "init", refuse)
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "a router unit test initialized Ray"


@pytest.fixture
def current_loop():
    """A fresh event loop set as the thread's current loop for the test: `PendingRequest` binds
    its future to the current loop when built, so requests can then be built outside coroutines."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def run(coro):
    """Run `coro` on the test's current loop (the `current_loop` fixture)."""
    return asyncio.get_event_loop().run_until_complete(coro)


def choose(router, candidates, pr):
    """`router.choose_replicas(candidates, pr)`, as Ray awaits it."""
    return run(router.choose_replicas(candidates, pr))


class FakeClock:
    """Wall clock under test control: call it for the time, `advance(s)` to move it."""

    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def stats(buckets=(1, 2, 4, 8), *, running: int = 0, queued: int = 0,
          max_seq_len: int = 2048, max_num_seqs: Optional[int] = None,
          free_slots: Optional[int] = None, timestamp: float = NOW, **kw: Any) -> ReplicaStats:
    """ReplicaStats with defaults that make an idle replica whose slots equal its largest bucket."""
    slots = (buckets[-1] if buckets else 1) if max_num_seqs is None else max_num_seqs
    free = slots - running if free_slots is None else free_slots
    return ReplicaStats(captured_buckets=tuple(buckets), max_seq_len=max_seq_len,
                        max_num_seqs=slots, running=running, free_slots=free, queued=queued,
                        graphs=kw.pop("graphs", True), timestamp=timestamp, **kw)


class FakeRunningReplica(RunningReplica):
    """A `RunningReplica` without an actor: `routing_stats` is a plain attribute (a dict, as Ray
    hands it over), `queue_len` answers probes after `probe_delay_s`."""

    def __init__(self, name: str, routing_stats: Any = None, *, queue_len: int = 0,
                 probe_delay_s: float = 0.0, max_ongoing_requests: int = 64):
        self._id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self._stats = {} if routing_stats is None else routing_stats
        self.queue_len = queue_len
        self.probe_delay_s = probe_delay_s
        self._max_ongoing = max_ongoing_requests

    @property
    def replica_id(self) -> ReplicaID:
        return self._id

    @property
    def routing_stats(self) -> Any:
        return self._stats

    @routing_stats.setter
    def routing_stats(self, value: Any) -> None:
        self._stats = value

    @property
    def max_ongoing_requests(self) -> int:
        return self._max_ongoing

    @property
    def multiplexed_model_ids(self) -> set:
        return set()

    @property
    def is_cross_language(self) -> bool:
        return False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(self.probe_delay_s)
        return self.queue_len

    def __repr__(self) -> str:
        return f"FakeRunningReplica({self._id.unique_id})"


def replica(name: str, s: Optional[ReplicaStats] = None, **kw: Any) -> FakeRunningReplica:
    """A fake replica publishing `s` (None: nothing published yet, i.e. `{}`)."""
    return FakeRunningReplica(name, {} if s is None else s.to_dict(), **kw)


def pending(hint: Any = None, *, request_id: Optional[str] = None, **kwargs: Any) -> PendingRequest:
    """A PendingRequest as a handle call `h.remote(routing_hint=hint, **kwargs)` produces."""
    if hint is not None:
        kwargs["routing_hint"] = hint
    rid = request_id or f"req-{next(_request_ids)}"
    return PendingRequest(args=[], kwargs=kwargs,
                          metadata=RequestMetadata(request_id=rid, internal_request_id=rid))


def hint(n: int, max_total_tokens: int = 128, **v2: Any) -> RoutingHint:
    """A hint for n sequences; version-2 fields (prompt_tokens, max_new_tokens, ...) by keyword."""
    return RoutingHint(num_sequences=n, max_total_tokens=max_total_tokens, **v2)


def job(prompts: list, max_tokens: int, *, block_size: int = BLOCK, n: int = 1) -> RoutingHint:
    """The hint an ingress attaches to a batch of token-id `prompts` with `max_tokens` each and `n`
    samples per prompt (replica.block_hash computes the prefix summaries, as the ingress does)."""
    longest = max(len(p) for p in prompts)
    return RoutingHint(len(prompts) * n, longest + max_tokens,
                       prompt_tokens=sum(len(p) for p in prompts) * n,
                       max_new_tokens=len(prompts) * n * max_tokens,
                       prefix_hashes=tuple(prefix_summary(p, block_size) for p in prompts),
                       samples_per_prompt=n)


def cached(*prompts: list, block_size: int = BLOCK) -> tuple[int, ...]:
    """The prefix summary a replica publishes when it holds these token sequences in its cache."""
    return tuple(h for p in prompts for _, h in prefix_summary(p, block_size))


def tokens(seed: int, n: int) -> list[int]:
    """n token ids, the same for the same seed."""
    return [(seed * 7919 + i * 104729) % 32000 for i in range(n)]


def make_router(clock: Optional[FakeClock] = None, seed: int = 0, outcomes: Optional[list] = None,
                **kwargs: Any):
    """A real `BucketAwareRequestRouter`, built the way Ray's `Router` builds it (its constructor
    needs only a deployment id and handle source, and no running Ray), then `initialize_state`
    with a fake clock, a seeded rng and a list as the metric sink."""
    from router.request_router import BucketAwareRequestRouter

    r = BucketAwareRequestRouter(deployment_id=DEPLOYMENT,
                                 handle_source=DeploymentHandleSource.UNKNOWN,
                                 use_replica_queue_len_cache=kwargs.pop("use_cache", False))
    sink = outcomes.append if outcomes is not None else (lambda outcome: None)
    r.initialize_state(seed=seed, clock=clock or FakeClock(), record_outcome=sink, **kwargs)
    return r


def rank(h, candidates, *, now=NOW, seed=0, outstanding=None):
    """`rank_replicas` with the test clock; also checks the invariants every ranking must hold."""
    r = rank_replicas(h, candidates, now=now, stale_after_s=STALE, rng=random.Random(seed),
                      outstanding=outstanding)
    flat = [k for tier in r.tiers for k in tier]
    assert sorted(flat) == sorted(k for k, _ in candidates), "every candidate exactly once"
    assert all(len(t) == 1 for t in r.tiers), "one replica per rank"
    assert r.outcome in OUTCOMES
    assert all(math.isfinite(e.last_token_s) for e in r.estimates.values())
    return r


def names(tiers) -> list[list[str]]:
    """Ranks of replicas (or of string keys) as ranks of names, for readable asserts."""
    return [[x if isinstance(x, str) else x.replica_id.unique_id for x in t] for t in tiers]
