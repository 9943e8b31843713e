"""A chat's next turn runs on the replica that holds its previous turns' KV blocks (issue 10).

Real Serve on the session's cluster (CPU, 2 fake GPUs): two identical replicas of random:tiny with
8-token KV blocks and the prefix cache on. Eight conversations send turn 1 (a ~135-block prompt of
random byte tokens) at once, so the router spreads them over both replicas; then each
conversation, one at a time, sends turn 2 = turn 1's prompt + the token ids the model answered +
new user tokens, and turn 3 the same way. Every turn goes through the ingress handle's `generate`,
whose `BatchResult` carries the output token ids and the replica that served it.

What proves it, read from the replicas' own `counters()` around each turn (never from the router):
the turn ran on its conversation's replica (that replica received a batch, the other did not) and
its prompt hit the prefix cache there for at least every full block of the previous turn's prompt.
A router that ignores prefixes picks the right replica for 16 follow-up turns with probability
2^-16: run this module with GRAPHSERVE_AFFINITY_ROUTER=default (Ray's power-of-two router) to see
it fail.
"""
from __future__ import annotations

import os
import random

import pytest

from serve_helpers import wait_for, wait_for_routing_stats
from deployments.app import APP_NAME, build_app
from deployments.config import AppArgs

ROUTERS = {"ours": "router.request_router:BucketAwareRequestRouter",
           "default": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
ROUTER = os.environ.get("GRAPHSERVE_AFFINITY_ROUTER", "ours")
BLOCK = 8
CONVERSATIONS = 8
TURNS = 3
FIRST_PROMPT = (1040, 1100)   # tokens: > 128 blocks, a depth the prefix summaries publish
USER_TURN = (16, 48)          # new user tokens per later turn
MAX_TOKENS = 1                # the first token only (made by the prefill): the estimate is the prefill
                              # alone, and a cache hit saves ~96% of it. With decode steps in it, the
                              # two replicas' CPU step times, measured under CI's load, once outweighed
                              # that (a fresh-clone CI run: 14/16 with MAX_TOKENS 2)


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    args = AppArgs(model="random:tiny", batch_buckets=[1, 2, 4, 8], max_num_seqs=8, max_seq_len=2048,
                   block_size=BLOCK, num_replicas=2, ingress_replicas=1,   # one router: where turns land
                   router={"request_router_class": ROUTERS[ROUTER], "request_routing_stats_period_s": 0.5})
    handle = serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    wait_for(lambda: len(counters()) == 2, 60, "both LLMReplica replicas to answer a broadcast")
    wait_for_routing_stats(lambda: counters().values(), 2)
    rng = random.Random(1)

    def spread() -> bool:   # warm-up: each replica runs its first (slow) steps before the test
        refs = [handle.generate.remote([[rng.randrange(256) for _ in range(64)]], max_tokens=2)
                for _ in range(2)]
        return len({r.result().replica for r in refs}) == 2

    if ROUTER == "ours":
        wait_for(spread, 30, "two requests to spread over both replicas")
    yield handle
    serve.delete(APP_NAME)


def counters() -> dict[str, dict]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMReplica", APP_NAME)
    return {c["replica"]: c for c in handle.broadcast("counters").results()}


def published() -> dict[str, dict]:
    """What each replica would publish to the router now (its estimate's inputs), for messages."""
    keys = ("running", "queued", "prefill_backlog_tokens", "prefill_tokens_per_s", "decode_step_s",
            "free_blocks", "timestamp")
    return {r: {k: c["routing_stats"].get(k) for k in keys}
            | {"prefix_hashes": len(c["routing_stats"]["prefix_hashes"])} for r, c in counters().items()}


def _batches(c: dict) -> int:
    return sum(c["batch_sizes"].values())


def test_each_turn_runs_where_the_conversation_s_blocks_are(app):
    rng = random.Random(10)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(*FIRST_PROMPT))] for _ in range(CONVERSATIONS)]
    # Turn 1, all at once: the router spreads the conversations by load.
    first = [app.generate.remote([p], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
             for p in prompts]
    home = []
    for p, ref in zip(prompts, first):
        res = ref.result(timeout_s=120)
        p.extend(res.completions[0].token_ids)
        home.append(res.replica)
    split = {r: home.count(r) for r in set(home)}
    assert len(split) == 2 and min(split.values()) >= 2, f"turn 1 did not spread: {split}"

    followed, misses = 0, []
    for turn in range(2, TURNS + 1):
        for conv, p in enumerate(prompts):
            cached_at_least = (len(p) - MAX_TOKENS) // BLOCK * BLOCK   # the previous turn's prompt blocks
            p.extend(rng.randrange(256) for _ in range(rng.randint(*USER_TURN)))
            before = counters()
            res = app.generate.remote([p], max_tokens=MAX_TOKENS, temperature=0.0,
                                      ignore_eos=True).result(timeout_s=120)
            after = counters()
            ran = [r for r in after if _batches(after[r]) > _batches(before[r])]
            hits = {r: after[r]["prefix_hit_tokens"] - before[r]["prefix_hit_tokens"] for r in after}
            assert ran == [res.replica], (ran, res.replica)
            if res.replica == home[conv] and hits[res.replica] >= cached_at_least:
                followed += 1
            else:
                misses.append(f"conversation {conv} turn {turn}: ran on {res.replica} (home "
                              f"{home[conv]}), prefix hits {hits}, expected >= {cached_at_least}; "
                              f"published: {published()}")
            p.extend(res.completions[0].token_ids)
    total = CONVERSATIONS * (TURNS - 1)
    assert not misses, f"router {ROUTER}: {followed}/{total} follow-up turns ran where their blocks " \
                       f"were; split of turn 1 {split}:\n" + "\n".join(misses)
