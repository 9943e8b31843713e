"""Routers on a simulated fleet: ours against Ray's power-of-two, on serve_load's traces, in seconds.

No GPU, no running Ray: each replica is a discrete-event model of the engine (benchmarks/
sim_engine.py: continuous batching with a step token budget, mixed prefill+decode steps, a row
limit, captured buckets, an LRU prefix cache of block hashes) timed by a cost model fitted to the
H200 measurements in benchmarks/results/ (llama-8b). Our router is the real
`BucketAwareRequestRouter` (its ranking and its ledger, `rank_candidates` / `on_request_routed` /
`on_request_completed`) reading stats the model publishes every `--stats-period-s`; Ray's
default is modelled as it routes two replicas: the one with fewer ongoing requests. Both respect
`max_ongoing_requests` (a request waits at the router while every replica is full). Traces,
seeds and phases are serve_traces' (GPU sizes).

What it is for: the direction of a policy change across many traces, seeds and layouts before a
GPU run, and the structure of a result (e.g. how many replicas the multi-turn bar needs). What it
is not: a measurement. The engine model leaves out the Ray path (~10-20 ms per request), stream
pacing, preemption, sampling and any host time; its numbers are never quoted as results.

    python benchmarks/route_sim.py                               # tiers and ladder, 4 traces x 3 seeds
    python benchmarks/route_sim.py --layout tiers --traces chat --replicas 2 --seeds 0,1,2,3,4

Prints, per layout x trace x phase, ours/default ratios of tokens/s, TTFT p50/p99 (all turns and
chat follow-ups) and each router's split of sequences over replicas.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import serve_traces as st  # noqa: E402
from benchmarks.sim_engine import LADDER, Seq, SimReplica  # noqa: E402
from replica.block_hash import prefix_summary  # noqa: E402
from router.stats import RoutingHint  # noqa: E402

LAYOUTS = {"ladder": [(LADDER, 512)], "tiers": [((1, 2, 4, 8), 8), ((16, 32, 64), 64)]}


# -- requests, routers and the event loop ---------------------------------------------------------
@dataclass
class SimJob:
    """One serve_traces job in flight: its current request (a batch, or a chat turn)."""
    kind: str
    arrived: float
    prompts: list
    max_tokens: int
    turns: list                     # chat: (user tokens, max_tokens) still to send
    turn: int = 1
    rid: str = ""                   # "<job>/<turn>": one Ray request id per turn
    replica: Optional[int] = None
    sent_at: float = 0.0            # when this turn was sent (a wait at the router counts in TTFT)
    left: int = 0                   # sequences of the current request not finished yet
    ingress: int = 0                # which ingress (router instance) routed the current request
    outputs: dict = field(default_factory=dict)


def hint_for(job: SimJob, block_size: int) -> RoutingHint:
    """What the ingress attaches (deployments/frontend.py): sizes and prefix summaries."""
    longest = max(len(p) for p in job.prompts)
    return RoutingHint(len(job.prompts), longest + job.max_tokens,
                       prompt_tokens=sum(len(p) for p in job.prompts),
                       max_new_tokens=len(job.prompts) * job.max_tokens,
                       prefix_hashes=tuple(prefix_summary(p, block_size) for p in job.prompts))


class OursRouter:
    """The real BucketAwareRequestRouter on duck-typed replicas, on the simulation's clock."""

    def __init__(self, n: int, seed: int, clock: Callable[[], float], peers: int = 1):
        from ray.serve._private.common import DeploymentHandleSource, DeploymentID
        from router.request_router import BucketAwareRequestRouter

        self.router = BucketAwareRequestRouter(deployment_id=DeploymentID(name="LLMReplica", app_name="sim"),
                                               handle_source=DeploymentHandleSource.UNKNOWN)
        self.router.initialize_state(seed=seed, clock=clock, record_outcome=lambda outcome: None, peers=peers)
        self.replicas = [SimpleNamespace(replica_id=i, routing_stats={}) for i in range(n)]

    def publish(self, i: int, stats: dict) -> None:
        self.replicas[i].routing_stats = stats

    def order(self, job: SimJob, hint: RoutingHint, ongoing: list[int]) -> list[int]:
        pr = SimpleNamespace(kwargs={"routing_hint": hint}, metadata=SimpleNamespace(internal_request_id=job.rid))
        return [tier[0].replica_id for tier in self.router.rank_candidates(self.replicas, pr)]

    def routed(self, job: SimJob, hint: RoutingHint) -> None:
        pr = SimpleNamespace(kwargs={"routing_hint": hint}, metadata=SimpleNamespace(internal_request_id=job.rid))
        self.router.on_request_routed(pr, job.replica, None)

    def completed(self, job: SimJob) -> None:
        self.router.on_request_completed(job.replica, job.rid)


class PowerOfTwoRouter:
    """Ray's default: two random replicas, the one with fewer ongoing requests first."""

    def __init__(self, n: int, seed: int, clock=None, peers: int = 1):
        self.n, self.rng = n, random.Random(seed)

    def publish(self, i, stats):
        pass

    def order(self, job, hint, ongoing):
        two = self.rng.sample(range(self.n), min(2, self.n))
        return sorted(two, key=lambda i: (ongoing[i], self.rng.random()))

    def routed(self, job, hint):
        pass

    def completed(self, job):
        pass


ROUTERS = {"default": PowerOfTwoRouter, "ours": OursRouter}


class Fleet:
    """The event loop: arrivals, routing (with max_ongoing_requests), engine steps, stats publishes."""

    def __init__(self, layout: str, replicas: int, router: str, seed: int, stats_period_s: float,
                 max_ongoing: int, block_size: int, ingresses: int = 1, peers: int = 1):
        shapes = LAYOUTS[layout]
        self.reps = [SimReplica(f"r{i}", *shapes[i % len(shapes)], block_size=block_size) for i in range(replicas)]
        self.now = 0.0
        # one router per ingress replica: each keeps its own ledger of what it sent, and all read
        # the same published stats; a request goes to a random ingress (each turn on its own)
        self.routers = [ROUTERS[router](replicas, seed + k, lambda: self.now, peers) for k in range(ingresses)]
        self.period, self.max_ongoing, self.bs = stats_period_s, max_ongoing, block_size
        self.ongoing = [0] * replicas
        self.events: list = []
        self.tick = itertools.count()
        self.parked: list[SimJob] = []
        self.records: list[dict] = []
        self.rng = random.Random(seed)

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.tick), fn, args))

    def run(self, jobs: list[st.Job], horizon_s: float) -> None:
        for k, j in enumerate(jobs):
            sj = SimJob(j.kind, j.at, [tuple(p) for p in j.prompts], j.max_tokens, list(j.turns),
                        rid=f"j{k}/1", sent_at=j.at)
            self.at(j.at, self.send, sj)
        for i in range(len(self.reps)):
            self.at(self.rng.uniform(0, self.period), self.publish, i)
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if t > horizon_s:
                break
            self.now = t
            fn(*args)

    def publish(self, i: int) -> None:
        for router in self.routers:
            router.publish(i, self.reps[i].stats(self.now))
        self.at(self.now + self.period, self.publish, i)

    def send(self, job: SimJob) -> None:
        hint = hint_for(job, self.bs)
        job.ingress = self.rng.randrange(len(self.routers)) if len(self.routers) > 1 else 0
        router = self.routers[job.ingress]
        for i in router.order(job, hint, self.ongoing):
            if self.ongoing[i] < self.max_ongoing:
                job.replica = i
                self.ongoing[i] += 1
                router.routed(job, hint)
                seqs = [Seq(job, p, job.max_tokens) for p in job.prompts]
                job.left = len(seqs)
                self.reps[i].submit(seqs)
                self.kick(i)
                return
        self.parked.append(job)          # every ranked replica full: wait for a completion

    def kick(self, i: int) -> None:
        rep = self.reps[i]
        if not rep.stepping and (rep.running or rep.waiting):
            rep.stepping = True
            dur, first, done = rep.step(self.now)
            self.at(self.now + max(dur, 1e-4), self.step_done, i, first, done)

    def step_done(self, i: int, first: list[Seq], done: list[Seq]) -> None:
        rep = self.reps[i]
        rep.stepping = False
        for s in first:
            s.first_token_at = self.now
        for s in done:
            self.finish(s)
        self.kick(i)

    def finish(self, s: Seq) -> None:
        job = s.job
        self.records.append(dict(job=job.rid.split("/")[0], kind=job.kind, turn=job.turn,
                                 ttft=s.first_token_at - job.sent_at, cached=s.cached,
                                 tokens=s.max_tokens, end=self.now, replica=job.replica,
                                 tpot=(self.now - s.first_token_at) / max(s.max_tokens - 1, 1)))
        job.outputs[s.prompt] = _output(job.rid, s.max_tokens)
        job.left -= 1
        if job.left:
            return
        self.ongoing[job.replica] -= 1
        self.routers[job.ingress].completed(job)
        if job.kind == "chat" and job.turns:
            user, max_tokens = job.turns.pop(0)
            prompt = job.prompts[0]
            job.prompts = [prompt + job.outputs[prompt] + tuple(user)]
            job.max_tokens, job.turn = max_tokens, job.turn + 1
            job.rid, job.sent_at = f"{job.rid.split('/')[0]}/{job.turn}", self.now
            self.at(self.now, self.send, job)
        parked, self.parked = self.parked, []
        for p in parked:
            self.send(p)


def _output(rid: str, n: int) -> tuple[int, ...]:
    return tuple(random.Random(rid).randbytes(n))


# -- phases and the report ------------------------------------------------------------------------
def run_phase(layout: str, replicas: int, router: str, jobs: list, a) -> dict:
    """One phase on a fresh fleet; the metrics the report prints (and `records`, per sequence)."""
    fleet = Fleet(layout, replicas, router, a.router_seed, a.stats_period_s, a.max_ongoing, a.block_size,
                  getattr(a, "ingresses", 1), getattr(a, "peers", None) or getattr(a, "ingresses", 1))
    fleet.run(jobs, a.horizon_s)
    recs = fleet.records
    start = min((j.at for j in jobs), default=0.0)
    end = max((r["end"] for r in recs), default=start)
    want = sum(j.output_tokens for j in jobs)
    got = sum(r["tokens"] for r in recs)

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3 if xs else None

    path = getattr(a, "path_ms", 0.0) / 1e3   # the request path the model leaves out, per TTFT
    inter = [r["ttft"] + path for r in recs if r["kind"] in ("interactive", "chat")]
    follow = [r["ttft"] + path for r in recs if r["kind"] == "chat" and r["turn"] > 1]
    return dict(tokens_per_s=got / max(end - start, 1e-9), done=got / max(want, 1),
                ttft50=q([r["ttft"] + path for r in recs], 0.5), ittft99=q(inter, 0.99),
                fttft50=q(follow, 0.5), tpot50=q([r["tpot"] for r in recs], 0.5),
                split=[rep.sequences for rep in fleet.reps], records=recs)


def ratio(o, d):
    return None if o is None or not d else o / d


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="tiers,ladder")
    ap.add_argument("--traces", default="mix,heavy,chat,chat-long")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--phases", default="burst,lo,hi")
    ap.add_argument("--rates", default="0.4,0.8",
                    help="open-loop lo,hi as fractions of the default's burst tokens/s")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--window-s", type=float, default=5.0)
    ap.add_argument("--horizon-s", type=float, default=120.0)
    ap.add_argument("--stats-period-s", type=float, default=1.0)
    ap.add_argument("--max-ongoing", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--router-seed", type=int, default=0)
    ap.add_argument("--ingresses", type=int, default=1,
                    help="router instances (ingress replicas), each with its own ledger; requests spread at random")
    ap.add_argument("--peers", type=int, default=None,
                    help="the routers' `peers` setting (default: --ingresses, as the app sets it)")
    ap.add_argument("--path-ms", type=float, default=0.0,
                    help="added to every TTFT: what the model leaves out (the Ray path, stream, host); "
                         "~45 ms = 2x H200 chat TTFT p50 at low load (58-82 ms) less the model's (13 ms)")
    ap.add_argument("--absolute", action="store_true", help="also print each router's own numbers")
    a = ap.parse_args(argv)
    rates = dict(zip(("lo", "hi"), (float(x) for x in a.rates.split(","))))
    print("simulated (benchmarks/route_sim.py: a model, not a measurement); ratios ours/default")
    print(f"{'layout':7s} {'trace:phase':16s} {'tok/s':>6s} {'ttft50':>6s} {'ittft99':>7s} {'fttft50':>7s} "
          f"{'tpot50':>6s}  split ours | default")
    for layout in a.layout.split(","):
        for name in a.traces.split(","):
            trace = st.TRACES["gpu"][name]
            for seed in (int(x) for x in a.seeds.split(",")):
                capacity = None
                for phase in a.phases.split(","):
                    if phase == "burst":
                        jobs = st.burst(trace, seed)
                    else:
                        if capacity is None:
                            burst = st.burst(trace, seed)
                            capacity = run_phase(layout, a.replicas, "default", burst, a)["tokens_per_s"]
                        r = st.rates_for(trace, rates[phase] * capacity, http_cap=1e9)
                        jobs = st.open_loop(trace, seed, phase, r, a.window_s)
                    d = run_phase(layout, a.replicas, "default", jobs, a)
                    o = run_phase(layout, a.replicas, "ours", jobs, a)
                    if phase == "burst":
                        capacity = d["tokens_per_s"]
                    cells = [ratio(o[k], d[k]) for k in ("tokens_per_s", "ttft50", "ittft99", "fttft50", "tpot50")]
                    text = " ".join(f"{c:6.2f}" if c is not None else "     -" for c in cells)
                    print(f"{layout:7s} {name + '/s' + str(seed) + ':' + phase:16s} {text}  "
                          f"{':'.join(map(str, o['split']))} | {':'.join(map(str, d['split']))}"
                          + ("" if o["done"] > 0.999 and d["done"] > 0.999 else
                             f"  (unfinished: ours {o['done']:.2f}, default {d['done']:.2f})"), flush=True)
                    if a.absolute:
                        for who, x in (("ours", o), ("default", d)):
                            keys = ("tokens_per_s", "ttft50", "ittft99", "fttft50", "tpot50")
                            print(f"{'':24s}{who:8s} " + " ".join(f"{k} {x[k]:.0f}" for k in keys
                                                                     if x[k] is not None))


if __name__ == "__main__":
    main()
