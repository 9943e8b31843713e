"""Issue 9's soak: the whole app under tens of thousands of mixed requests, then a leak check.

One command (CPU is enough; the app is random:tiny):

    PYTHONPATH=. python benchmarks/soak.py                  # 20,000 requests, ~5 min on 2 cores
    PYTHONPATH=. python benchmarks/soak.py --requests 2000  # a quick look

It starts a local Ray (2 CPUs) and Serve on a free port, deploys `deployments.app:build_app`
(random:tiny, buckets [1, 2, 4, 8], 8 KV slots + 8 queued sequences, a 64 KiB body limit, one
decode replica) under a unique app name, and sends `--requests` requests from `--clients`
concurrent HTTP clients, drawn from a seeded mix:
  completion / chat (whole answers), stream / chat stream (read to [DONE]), batch (2-4 prompts,
  n 1-2), disconnect (a stream closed after its first event), cancel (a client timeout mid-request),
  bad (one of the API contract's bad inputs: must be a 4xx).
At `--kill-at` of the way through it SIGKILLs the decode replica once (an injected fault): 5xx
answers from then until the app answers again (+5 s) count as injected; any other 5xx fails the run.

Reported (JSON in benchmarks/results/, a summary on stdout):
- status counts per kind, latency p50/p99, the injected outage (kill -> recovered);
- leaks, read from the replica once the app is idle: running, queued, free KV slots vs max_num_seqs,
  free KV blocks vs total (when the engine has blocks), sequences admitted by the BatchRunner, and
  sequences received vs sequences the engine finished or aborted (for the replica alive at the end);
- memory: RSS of the ingress and decode replica processes sampled every 2 s; growth after warm-up
  (the first 20% of the requests; the replica's window ends at the kill) must stay under 10% and
  32 MiB.
Verdict `ok` needs: zero leaks, flat memory, every bad input a 4xx, no un-injected 5xx.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from benchmarks.common import log, out_path, write_json  # noqa: E402

KINDS = {"completion": 22, "chat": 18, "stream": 12, "chat_stream": 10, "batch": 8,
         "disconnect": 10, "cancel": 10, "bad": 10}
BAD = [  # (body or raw bytes); every one must be a 4xx
    {"prompt": "a\ud800b"}, {"prompt": "x", "max_tokens": True}, {"prompt": "x", "tools": []},
    {"prompt": "x", "echo": True}, {"prompt": "x", "whatever": 1}, {"prompt": [1, 100000]},
    {"prompt": "x", "n": 99}, {"prompt": "x", "seed": 2**63}, {"prompt": "x", "stop": ["s"] * 10000},
    {"prompt": "x", "model": "nope"}, {"messages": [{"role": "tool", "content": "x"}]},
    {"prompt": "x" * 70_000}, b"{oops", b"[" * 30_000 + b"]" * 30_000, b'{"prompt": "\xff"}',
]
CHARS = "abcdefghijklmnopqrstuvwxyz ,.!?0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(lo, hi)))


def draw(rng: random.Random) -> tuple[str, str, object]:
    """(kind, path, body or raw bytes) of one request."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    sampling = {"max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.7, 1.0]),
                "seed": rng.randint(0, 2**31)}
    chat = {"messages": [{"role": "user", "content": text(rng, 1, 40)}], **sampling}
    if kind == "bad":
        body = rng.choice(BAD)
        return kind, "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
            else "/v1/completions", body
    if kind in ("chat", "chat_stream"):
        return kind, "/v1/chat/completions", {**chat, "stream": kind == "chat_stream"}
    if kind == "batch":
        prompts = [text(rng, 1, 40) for _ in range(rng.randint(2, 4))]
        return kind, "/v1/completions", {"prompt": prompts, "n": rng.randint(1, 2), **sampling}
    body = {"prompt": text(rng, 1, 60), **sampling}
    if kind in ("stream", "disconnect"):
        body.update(stream=True, max_tokens=rng.randint(4, 24) if kind == "disconnect" else body["max_tokens"])
    if kind == "cancel":   # the client gives up after 0.05-0.5 s, often mid-generation
        body.update(max_tokens=rng.randint(16, 64), ignore_eos=True, _timeout=rng.uniform(0.05, 0.5))
    return kind, "/v1/completions", body


async def send(client: httpx.AsyncClient, kind: str, path: str, body) -> int:
    """The HTTP status (0 for a request the client itself abandoned)."""
    timeout = body.pop("_timeout", None) if isinstance(body, dict) else None
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if kind in ("stream", "chat_stream", "disconnect"):
        async with client.stream("POST", path, content=raw, headers=headers) as resp:
            async for line in resp.aiter_lines():
                if kind == "disconnect" and line:
                    return resp.status_code          # hang up after the first event
            return resp.status_code
    if kind == "cancel":
        try:
            resp = await client.post(path, content=raw, headers=headers, timeout=timeout)
            return resp.status_code
        except httpx.TimeoutException:
            return 0
    return (await client.post(path, content=raw, headers=headers)).status_code


def rss_mb(tag: str) -> dict[str, float]:
    """RSS (MiB) of this run's Serve replica processes, by deployment name."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            if f"ServeReplica:{tag}:" not in cmd:
                continue
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        # Ray's process title is "ray::ServeReplica:<app>:<deployment>[.<method running now>]".
        name = cmd.split(f"ServeReplica:{tag}:")[1].split()[0].strip("\x00").split(".")[0]
        out[name] = out.get(name, 0.0) + rss / 1024
    return out


class Soak:
    def __init__(self, args, base: str, tag: str):
        self.args, self.base, self.tag = args, base, tag
        self.rng = random.Random(args.seed)
        self.next = 0
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list] = defaultdict(list)
        self.unexpected: list = []
        self.memory: list = []            # (requests done, seconds, {deployment: MiB})
        self.kill = {"at_request": int(args.requests * args.kill_at) if args.kill_at else None}
        self.injected_until = None        # monotonic end of the injected-fault window
        self.done = 0
        self.t0 = time.monotonic()

    def injected(self) -> bool:
        return "t" in self.kill and (self.injected_until is None or time.monotonic() < self.injected_until)

    async def worker(self, client: httpx.AsyncClient) -> None:
        while self.next < self.args.requests:
            i, self.next = self.next, self.next + 1
            if i == self.kill["at_request"]:
                await self.inject()
            kind, path, body = draw(self.rng)
            t = time.monotonic()
            try:
                code = await send(client, kind, path, body)
            except httpx.HTTPError as e:
                code = -1
                self.unexpected.append([i, kind, f"{type(e).__name__}: {e}"[:200]])
            self.latency[kind].append(time.monotonic() - t)
            self.status[kind][code] += 1
            self.done += 1
            self.check(i, kind, code, t)

    def check(self, i: int, kind: str, code: int, started: float) -> None:
        if code >= 500:
            if self.injected():
                self.status[kind]["5xx_injected"] += 1   # (also counted under its code)
            else:
                self.unexpected.append([i, kind, code])
        elif kind == "bad" and not 400 <= code < 500:
            self.unexpected.append([i, kind, code])
        # Recovered: the first answer to a request sent after the kill (an answer already in flight
        # at the kill says nothing about the replacement).
        if (code == 200 and "t" in self.kill and started > self.kill["t"]
                and self.injected_until is None):
            self.injected_until = time.monotonic() + 5.0
            self.kill["recovered_s"] = round(time.monotonic() - self.kill["t"], 1)

    async def inject(self) -> None:
        from ray import serve
        handle = serve.get_deployment_handle("LLMReplica", self.tag)
        (c,) = await handle.broadcast("counters").results_async(timeout_s=30)
        self.kill.update(pid=c["pid"], t=time.monotonic(), at_s=round(time.monotonic() - self.t0, 1))
        os.kill(c["pid"], signal.SIGKILL)
        log(f"injected fault: SIGKILL decode replica pid {c['pid']} at request {self.kill['at_request']}")

    async def sample_memory(self) -> None:
        while self.done < self.args.requests:
            self.memory.append([self.done, round(time.monotonic() - self.t0, 1), rss_mb(self.tag)])
            if len(self.memory) % 30 == 0:
                log(f"{self.done} requests, rss {self.memory[-1][2]}")
            await asyncio.sleep(2.0)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.clients, max_keepalive_connections=self.args.clients)
        async with httpx.AsyncClient(base_url=self.base, timeout=120, limits=limits) as client:
            sampler = asyncio.create_task(self.sample_memory())
            await asyncio.gather(*(self.worker(client) for _ in range(self.args.clients)))
            sampler.cancel()


def growth(series: list, start: int, end: int, name: str) -> dict:
    pts = [m[name] for done, _, m in series if start <= done <= end and name in m]
    if len(pts) < 3:
        return {"samples": len(pts), "flat": None}
    first = statistics.median(pts[: max(1, len(pts) // 5)])
    last = statistics.median(pts[-max(1, len(pts) // 5):])
    grew = last - first
    return {"samples": len(pts), "start_mib": round(first, 1), "end_mib": round(last, 1),
            "growth_mib": round(grew, 1), "flat": grew < max(32.0, 0.10 * first)}


async def settle(tag: str, timeout_s: float = 60.0) -> tuple[dict, dict]:
    """The replica's counters and routing stats once nothing runs (or after timeout_s)."""
    from ray import serve
    handle = serve.get_deployment_handle("LLMReplica", tag)
    deadline = time.monotonic() + timeout_s
    while True:
        (c,) = await handle.broadcast("counters").results_async(timeout_s=30)
        (s,) = await handle.broadcast("record_routing_stats").results_async(timeout_s=30)
        if (c["running"] == 0 and c["queued"] == 0 and c["admitted_sequences"] == 0) or time.monotonic() > deadline:
            return c, s
        await asyncio.sleep(1.0)


def leak_report(c: dict, s: dict) -> dict:
    received = sum(int(size) * n for size, n in c["batch_sizes"].items())
    ended = c["finished_requests"] + c["aborted_requests"]
    leaks = {"running": c["running"], "queued": c["queued"],
             "free_slots_missing": s["max_num_seqs"] - s["free_slots"],
             "admitted_sequences": c["admitted_sequences"],
             "sequences_not_ended": received - ended}
    if s.get("total_blocks"):   # block 0 is the engine's scratch block: never free, never leaked
        leaks["free_blocks_missing"] = s["total_blocks"] - 1 - s["free_blocks"]
    return {"leaks": leaks, "zero": all(v == 0 for v in leaks.values()),
            "sequences_received": received, "finished": c["finished_requests"],
            "aborted": c["aborted_requests"], "refused_batches": c["refused_batches"],
            "kv_blocks": "reported" if s.get("total_blocks") else "the engine reports no KV blocks (slots only)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--kill-at", type=float, default=0.75, help="fraction of the run; 0: no fault")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    tag = f"soak{os.getpid()}"
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = AppArgs(model="random:tiny", batch_buckets=[1, 2, 4, 8], max_num_seqs=8,
                       max_queued_sequences=8, max_seq_len=256, num_replicas=1,
                       num_gpus_per_replica=0, max_request_bytes=64 * 1024, replica_wait_s=3)
    serve.run(build_app(app_args), name=tag, route_prefix="/")
    log(f"app {tag} on port {port}; {args.requests} requests from {args.clients} clients")
    soak = Soak(args, f"http://127.0.0.1:{port}", tag)
    asyncio.run(soak.run())
    wall = time.monotonic() - soak.t0
    counters, stats = asyncio.run(settle(tag))
    leaks = leak_report(counters, stats)
    warm = int(args.requests * 0.2)
    kill_at = soak.kill["at_request"] or args.requests
    memory = {"ingress": growth(soak.memory, warm, args.requests, "OpenAIIngress"),
              "replica": growth(soak.memory, warm, kill_at, "LLMReplica")}
    bad_ok = all(400 <= int(code) < 500 for code in soak.status["bad"] if str(code).isdigit())
    verdict = (leaks["zero"] and not soak.unexpected and bad_ok
               and all(m["flat"] is not False for m in memory.values()))
    record = {"benchmark": "soak", "issue": 9, "verdict": "ok" if verdict else "FAILED",
              "engine_note": ("paged KV (blocks reported and checked)" if leaks["leaks"].get("free_blocks_missing")
                              is not None else "no KV blocks reported (slot-KV engine): block leaks not checked"),
              "config": {**vars(args), "app": app_args.model_dump(mode="json")},
              "env": {"python": sys.version.split()[0], "ray": ray.__version__,
                      "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
              "wall_s": round(wall, 1), "requests_per_s": round(args.requests / wall, 1),
              "status": {k: {str(c): n for c, n in v.items()} for k, v in soak.status.items()},
              "latency_s": {k: {"p50": round(statistics.median(v), 4),
                                "p99": round(sorted(v)[int(0.99 * (len(v) - 1))], 4), "n": len(v)}
                            for k, v in soak.latency.items()},
              "injected_fault": soak.kill, "unexpected": soak.unexpected[:50],
              "unexpected_count": len(soak.unexpected), "leak_check": leaks, "memory": memory,
              "memory_samples": soak.memory}
    path = out_path(args.out, f"soak-cpu-{time.strftime('%Y-%m-%d')}.json")
    write_json(path, record)
    log(f"{record['verdict']}: {args.requests} requests in {wall:.0f} s; leaks {leaks['leaks']}; "
        f"memory {memory}; unexpected {len(soak.unexpected)}; fault {soak.kill}; -> {path}")
    serve.shutdown()
    ray.shutdown()
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
