"""What the router adds in front of the engine: Ray's default router vs ours, on the graphserve app
with an engine that answers at once (no model, no GPU), so only the Serve path is measured.

For each router it deploys `deployments.app:build_app` with `engine_class=
benchmarks.route_overhead:HoldingEngine` (replica/instant_engine.py's stand-in, holding requests
--hold-s) on 2 replicas (2 fake GPUs, the app's default of one ingress per GPU replica). Then, at each --concurrency, it sends --requests HTTP completions
(token-id prompts of --prompt-tokens, max_tokens 1, not streamed); with --hold-s the engine holds
each request that long before answering, so the routers rank with that many requests in flight
(a loaded server holds hundreds per ingress). Reported per router and concurrency:
- the client latency p50 / p99;
- CPU ms per request of the ingress, replica and proxy processes (/proc, this host);
- the replicas' arrival p50 / p99: from the ingress's stamp (`PromptBatch.sent_at`, before it
  hashes the prompt's blocks for the hint) to the replica's runner, from the replicas'
  `arrival_ms_counts` (log-spaced buckets, 26% wide);
- with --count-tasks, the actor tasks each router caused on replicas and proxies (Ray's state API).
It prints ours / default ratios. Numbers are for this host's CPUs; the point is the difference
between the routers on identical requests.

  python benchmarks/route_overhead.py --out /tmp/route_overhead.json     # ~2 min on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import common as C  # noqa: E402
from benchmarks.serve_load import ROUTERS  # noqa: E402
from deployments.latency_histogram import difference, percentile as hist_percentile  # noqa: E402
from replica.instant_engine import InstantEngine  # noqa: E402

APP = "route-overhead"
HOLD_ENV = "GRAPHSERVE_ROUTE_OVERHEAD_HOLD_S"   # read by HoldingEngine in the replica processes


class HoldingEngine(InstantEngine):
    """The stand-in engine, holding each request `HOLD_ENV` seconds before its one token."""

    async def generate(self, request):
        await asyncio.sleep(float(os.environ.get(HOLD_ENV, "0")))
        async for chunk in super().generate(request):
            yield chunk


def deploy(router: str, port: int):
    from ray import serve
    from deployments.app import build_app
    from deployments.config import AppArgs
    args = AppArgs(model="random:tiny", batch_buckets=[1, 2, 4, 8, 16, 32, 64, 128], max_seq_len=4096,
                   num_replicas=2,
                   engine_class="benchmarks.route_overhead:HoldingEngine",
                   router={"request_router_class": ROUTERS[router], "request_routing_stats_period_s": 0.5})
    serve.run(build_app(args), name=APP, route_prefix="/", logging_config={"enable_access_log": False})
    return serve.get_deployment_handle("LLMReplica", APP)


PROCESS_KINDS = ("OpenAIIngress", "LLMReplica", "ProxyActor")


def cpu_seconds_by_kind() -> dict[str, float]:
    """CPU seconds (user + system) so far of this host's Serve processes, summed by kind (from
    /proc; empty where there is none)."""
    out = {k: 0.0 for k in PROCESS_KINDS}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            kind = next((k for k in PROCESS_KINDS if k in cmd), None)
            if kind:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[kind] += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def arrival_counts(handle) -> dict[str, list[int]]:
    """Each replica's arrival histogram counts, by replica tag."""
    return {r["replica"]: r["arrival_ms_counts"] for r in handle.broadcast("counters").results()}


async def send(url: str, n: int, concurrency: int, prompt_tokens: int) -> list[float]:
    import aiohttp
    latencies: list[float] = []
    queue = list(range(n))

    async def worker(session):
        while queue:
            i = queue.pop()
            body = {"model": "random:tiny", "prompt": [(7 * i + k) % 250 + 1 for k in range(prompt_tokens)],
                    "max_tokens": 1}
            t = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            latencies.append((time.perf_counter() - t) * 1e3)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
    return latencies


def task_counts(enabled: bool) -> dict[str, int]:
    """Actor tasks run so far, by name (Ray's state API; needs the dashboard and Serve's task
    events, both on with --count-tasks); {} when off."""
    if not enabled:
        return {}
    from ray.util.state import summarize_tasks
    return {name: sum(v["state_counts"].values()) for name, v in summarize_tasks()["cluster"]["summary"].items()}


def measure(router: str, a) -> dict:
    from ray import serve
    handle = deploy(router, a.port)
    url = f"http://127.0.0.1:{a.port}/v1/completions"
    asyncio.run(send(url, 8, 8, a.prompt_tokens))             # warm-up, not measured
    out = {}
    for conc in a.concurrency:
        before, cpu_before, tasks_before = arrival_counts(handle), cpu_seconds_by_kind(), task_counts(a.count_tasks)
        lat = asyncio.run(send(url, a.requests, conc, a.prompt_tokens))
        cpu = {k: (v - cpu_before[k]) * 1e3 / max(len(lat), 1) for k, v in cpu_seconds_by_kind().items()}
        if a.count_tasks:
            time.sleep(3)                                     # task events reach the state API late
        tasks = {k: n - tasks_before.get(k, 0) for k, n in task_counts(a.count_tasks).items()
                 if n > tasks_before.get(k, 0) and k.startswith(("ServeReplica", "ProxyActor"))}
        per_replica = {k: difference(v, before.get(k, [])) for k, v in arrival_counts(handle).items()}
        arrival = [sum(c) for c in zip(*per_replica.values())]
        out[str(conc)] = {"client_ms_p50": C.percentile(lat, 50), "client_ms_p99": C.percentile(lat, 99),
                          "arrival_ms_p50": hist_percentile(arrival, 50),
                          "arrival_ms_p99": hist_percentile(arrival, 99), "requests": len(lat),
                          "split": sorted((sum(c) for c in per_replica.values()), reverse=True),
                          **({"actor_tasks": tasks} if a.count_tasks else {}),
                          **{f"cpu_ms_per_request_{k}": v for k, v in cpu.items()}}
        print(f"{router:8s} concurrency {conc:3d}: client p50 {out[str(conc)]['client_ms_p50']:6.2f} "
              f"p99 {out[str(conc)]['client_ms_p99']:6.2f} ms, arrival p50 {out[str(conc)]['arrival_ms_p50']:.2f} "
              f"p99 {out[str(conc)]['arrival_ms_p99']:.2f} ms, split {out[str(conc)]['split']}; CPU ms per "
              "request " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
    serve.delete(APP)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--routers", default="default,ours", help="in run order")
    ap.add_argument("--hold-s", type=float, default=0.0, help="seconds the engine holds each request")
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--count-tasks", action="store_true",
                    help="count the actor tasks each router causes (starts the dashboard; slower)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import ray
    from ray import serve
    os.environ[HOLD_ENV] = str(a.hold_s)
    if a.count_tasks:
        os.environ["RAY_SERVE_ENABLE_TASK_EVENTS"] = "1"   # Serve turns replicas' task events off
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    ray.init(address="local", num_gpus=2, include_dashboard=a.count_tasks, log_to_driver=False,
             logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config={"log_level": "WARNING"})
    res = {"env": C.env_info("cpu"), "args": vars(a), "routers": {}}
    try:
        for router in a.routers.split(","):
            res["routers"][router] = measure(router, a)
    finally:
        serve.shutdown()
        ray.shutdown()
    if set(res["routers"]) != {"default", "ours"}:
        return _save(res, a.out)
    res["ours_over_default"] = {
        conc: {k: (res["routers"]["ours"][conc][k] / v if v else None)
               for k, v in res["routers"]["default"][conc].items() if k not in ("requests", "split", "actor_tasks")}
        for conc in res["routers"]["default"]}
    for conc, r in res["ours_over_default"].items():
        print(f"ours/default at concurrency {conc}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v))
    _save(res, a.out)


def _save(res: dict, path) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
