"""Issue 10's benchmark: the graphserve app on seeded traces, our router vs Ray's default router.

One command runs one bucket layout on 2 replicas (one GPU each; on a CPU host 2 fake GPUs and
random:tiny CPU engines):
  --layout ladder  every replica the engine's own ladder (AppArgs batch_buckets null: sized from its
                   KV pool, up to 512 rows on a GPU, 64 on a CPU);
  --layout tiers   bucket_sets [[1,2,4,8],[16,32,64]], KV slots per tier = its largest bucket.
For each router (default = `ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter`,
ours = `router.request_router:BucketAwareRequestRouter`; only the router class differs) it
deploys the app (`deployments.app:build_app`), warms it up (one small job of every kind, not
measured) and runs, seed-major, for each seed and trace (benchmarks/serve_traces.py: mix, heavy,
chat, chat-long):
  burst  the trace's burst, all at t=0 (capacity), stopped at --burst-cap-s;
  lo/hi  open loop: Poisson arrivals over --window-s offering --rates (0.4, 0.8) x the trace's
         capacity in output tokens/s (at least that fraction of --min-jobs arrivals), stopped
         --drain-s after the window.
At a stop, what still runs is cancelled (aborted in the engine) and kept as measured so far
(serve_clients.py); the next phase starts once the replicas are idle. Capacity, per trace: the
tokens/s of the first router's seed-0 burst of that trace (the default router runs seed 0 first,
so the open-loop rates are fractions of what the baseline sustains, and both routers get identical
jobs); --capacity pins it instead. Metrics, pooling and bars: benchmarks/serve_report.py.

Time: every phase is bounded (bursts by --burst-cap-s, open loops by window + drain), so a phase
costs at most its bound + ~1 s. --budget-s (from the script's start) splits what is left between
the segments still to run by phase count; a phase that would not fit its segment's share is
skipped and recorded (`skipped`), and a router runs a seed's phase only if the other router ran
it when that one went first. `--order alternate` (default) swaps which router goes first every
seed (benchmarks/serve_plan.py `segments`: 4 deploys for 3 seeds). GPU defaults (2x H200,
llama-8b): ray start ~10 s, each deploy ~15-30 s, 36 phases per router of <= 7-7.5 s + ~1 s
(bursts sized to ~3-6 s of work; heavy's 512-token outputs and chat's turns may reach the cap):
pass `--window-s 5 --drain-s 1 --burst-cap-s 6` to keep one layout at ~8.5 min; the budget
(530 s) stops it before 9.5 minutes either way.

  . .gpubundle/activate && python benchmarks/serve_load.py --layout ladder --window-s 5 --drain-s 1 --burst-cap-s 6 --out $OUT/serve_load-ladder.json
  . .gpubundle/activate && python benchmarks/serve_load.py --layout tiers --window-s 5 --drain-s 1 --burst-cap-s 6 --out $OUT/serve_load-tiers.json
  . .gpubundle/activate && python benchmarks/serve_load.py --num-replicas 4 --gpus-per-replica 0.5 --memory-utilization 0.45 --traces chat,chat-long --window-s 5 --drain-s 1 --burst-cap-s 6 --out $OUT/serve_load-4rep.json   # two replicas per GPU, ~5 min
  python benchmarks/serve_load.py --device cpu --port 8123            # CPU smoke, ~1.5 min, numbers mean nothing
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import common as C  # noqa: E402
from benchmarks import serve_traces as T  # noqa: E402
from benchmarks.serve_clients import Clients, LoopLag, run_phase  # noqa: E402
from benchmarks.serve_plan import plan, segments  # noqa: E402
from benchmarks.serve_spread import print_spread, spread  # noqa: E402
from benchmarks.serve_report import (bars, headline, ingress_latency, phase_metrics, print_summary, replica_delta,  # noqa: E402
                                     summarize)

APP = "graphserve"
ROUTERS = {"ours": "router.request_router:BucketAwareRequestRouter",
           "default": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
LAYOUTS = {"ladder": {}, "tiers": {"bucket_sets": [[1, 2, 4, 8], [16, 32, 64]]}}
TAIL_S = 15.0          # kept at the end of the budget: the last save, the table, ray shutdown
PHASE_OVERHEAD_S = 1.5  # counters, waiting for idle replicas, saving: first a guess, then measured
# (flag, GPU default, CPU smoke default, help)
SIZES = [("model", "random:llama-8b", "random:tiny", "engine model of every replica"),
         ("max-seq-len", 8192, 512, "AppArgs max_seq_len (the longest heavy and chat-long sequences fit)"),
         ("window-s", 6.0, 1.0, "open-loop arrival window"),
         ("drain-s", 1.5, 0.5, "open loop: stop this long after the window (what runs then is cut)"),
         ("burst-cap-s", 7.0, 3.0, "a burst is stopped (cut) this long after its start"),
         ("warmup-cap-s", 20.0, 10.0, "warm-up after each deploy, stopped after this"),
         ("http-rate-cap", 40.0, 20.0, "interactive HTTP requests/s at most (batch jobs carry the rest)"),
         ("min-jobs", 20.0, 10.0, "open loop: at least rate x this many jobs per window (a floor on the rates)"),
         ("fallback-capacity", 10000.0, 300.0, "output tokens/s assumed for a trace whose burst did not run")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="ladder")
    C.add_sized_args(ap, SIZES)
    ap.add_argument("--routers", default="default,ours", help="in run order; the first sets the rates")
    ap.add_argument("--order", choices=("alternate", "blocks"), default="alternate",
                    help="alternate: the first router swaps every seed (4 deploys for 3 seeds); blocks: one each")
    ap.add_argument("--traces", default="mix,heavy,chat,chat-long")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--phases", default="burst,lo,hi")
    ap.add_argument("--rates", default="0.4,0.8", help="open-loop lo,hi as fractions of the capacity")
    ap.add_argument("--burst-scale", type=float, default=1.0, help="multiplies every burst's job counts")
    ap.add_argument("--capacity", default="", help="pin capacities, e.g. mix=20000,heavy=12000 (tokens/s)")
    ap.add_argument("--num-replicas", type=int, default=2)
    ap.add_argument("--gpus-per-replica", type=float, default=None,
                    help="e.g. 0.5 with --num-replicas 4 on 2 GPUs (pair with --memory-utilization 0.45)")
    ap.add_argument("--memory-utilization", type=float, default=None, help="each replica's share of its GPU")
    ap.add_argument("--ingress-replicas", type=int, default=None,
                    help="AppArgs ingress_replicas (default: the app's, one per GPU replica; each "
                         "ingress runs its own router, and ours is told the count)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--stats-period-s", type=float, default=1.0, help="request_routing_stats_period_s")
    ap.add_argument("--budget-s", type=float, default=530.0, help="wall-clock budget from the script's start")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if _cuda_count() else "cpu"
    C.fill_sized_args(a, SIZES)
    return a


def _cuda_count() -> int:
    import torch
    return torch.cuda.device_count()


def traces(a) -> dict[str, T.Trace]:
    table = T.TRACES["gpu" if a.device.startswith("cuda") else "cpu"]
    return {name: table[name] for name in a.traces.split(",")}


# ---------------------------------------------------------------- deployment

def app_args(a, router: str) -> dict:
    return {"model": a.model, "max_seq_len": a.max_seq_len, "num_replicas": a.num_replicas,
            "ingress_replicas": a.ingress_replicas, "block_size": a.block_size, **LAYOUTS[a.layout],
            **({"num_gpus_per_replica": a.gpus_per_replica} if a.gpus_per_replica is not None else {}),
            **({"memory_utilization": a.memory_utilization} if a.memory_utilization is not None else {}),
            "router": {"request_router_class": ROUTERS[router],
                       "request_routing_stats_period_s": a.stats_period_s}}


def deploy(a, router: str) -> float:
    from ray import serve
    from deployments.app import build_app
    from deployments.config import AppArgs
    t = time.perf_counter()
    serve.run(build_app(AppArgs(**app_args(a, router))), name=APP, route_prefix="/",
              logging_config={"enable_access_log": False})  # one log line per request drowns the logs
    return time.perf_counter() - t


def start_ray(a) -> dict:
    import ray
    from ray import serve
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    gpus = _cuda_count() if a.device.startswith("cuda") else 2   # CPU: fake GPUs, eager CPU engines
    # address="local": a fresh cluster even when another one on this host wrote /tmp/ray/ray_current_cluster
    ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config={"log_level": "WARNING"})
    # Ray workers must import this checkout's router/ and deployments/ (PYTHONPATH above).
    code = ray.get(ray.remote(num_cpus=0)(lambda: __import__("router").__file__).remote())
    if not code.startswith(ROOT):
        raise RuntimeError(f"Ray workers import router from {code}, not from {ROOT}")
    return {"gpus": gpus, "worker_router_module": code}


def env_info(a) -> dict:
    """The run record's environment; the card from nvidia-smi, so this process never creates a CUDA
    context (one on GPU 0 would shrink replica 0's KV pool)."""
    info = C.env_info("cpu")
    info["device"] = a.device
    if a.device.startswith("cuda"):
        q = _smi("name,memory.total")
        if q:
            info["card"], info["card_memory_gb"] = q[0][0], round(float(q[0][1]) / 1024, 1)
    return info


def _smi(fields: str) -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]


def gpus_free(a, timeout_s: float = 30.0) -> None:
    """After a delete, wait until the GPUs' memory is released (the next deploy sizes its KV pool
    from free memory). nvidia-smi, so this process never creates a CUDA context."""
    if not a.device.startswith("cuda"):
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            used = [int(row[0]) for row in _smi("memory.used")]
        except ValueError:
            return
        if not used or max(used) < 2048:
            return
        time.sleep(1.0)
    C.log("warning: GPU memory still in use after the delete")


async def counters(deployment: str = "LLMReplica") -> list[dict]:
    """`counters()` of every replica of a deployment: the engines' (LLMReplica), or the ingress's
    own timing (OpenAIIngress: prepare() and first items)."""
    from ray import serve
    h = serve.get_deployment_handle(deployment, app_name=APP)
    return list(await asyncio.wait_for(h.broadcast("counters").results_async(), 60.0))


async def idle(timeout_s: float = 5.0) -> list[dict]:
    """Counters once every replica has nothing running or queued (cut sequences aborted), or
    after `timeout_s` (then the next phase starts on a busy app: `busy_at_start` in its metrics)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        c = await counters()
        if all(r["running"] == 0 and r["queued"] == 0 for r in c) or time.perf_counter() > deadline:
            return c
        await asyncio.sleep(0.1)


def busy(c: list[dict]) -> int:
    return sum(r["running"] + r["queued"] for r in c)


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self, a):
        self.a, self.budget = a, C.Budget(a.budget_s)
        self.path = C.out_path(a.out, f"serve_load-{a.layout}.json")
        self.traces, self.plan = traces(a), plan(a)
        self.jobs: dict[str, list[T.Job]] = {}
        self.seeds_run: dict[str, set[str]] = {}      # router -> seeds ("s0", ...) it has started
        self.overhead = PHASE_OVERHEAD_S
        pinned = dict(kv.split("=") for kv in a.capacity.split(",") if kv)
        self.res = {"env": env_info(a), "args": vars(a), "app_args": app_args(a, "ours"),
                    "plan": self.plan, "capacity": {t: {"tokens_per_s": float(v), "from": "--capacity"}
                                                    for t, v in pinned.items()},
                    "rates": {}, "workload": {}, "routers": {}, "skipped": []}
        for name, t in self.traces.items():
            if T.longest_sequence(t) > a.max_seq_len:
                raise SystemExit(f"trace {name}: sequences reach {T.longest_sequence(t)} tokens > "
                                 f"--max-seq-len {a.max_seq_len}")

    def save(self) -> None:
        """The record so far, its pooled summary and bars included (a killed run keeps them)."""
        try:
            self.res["summary"] = summarize(self.res)
            headline(self.res, self.res["summary"])
            self.res["bars"] = bars(self.res, self.res["summary"])
        except Exception as e:  # noqa: BLE001 - never lose the raw numbers to a summary bug
            self.res["summary_error"] = f"{type(e).__name__}: {e}"
        C.write_json(self.path, self.res)

    def phase_cap(self, key: str) -> float:
        return self.a.burst_cap_s if key.endswith("/burst") else self.a.window_s + self.a.drain_s

    def jobs_for(self, key: str) -> list[T.Job]:
        """The phase's jobs, drawn once (every router gets the same)."""
        if key not in self.jobs:
            trace, seed, kind = key.split("/")
            t, seed = self.traces[trace], int(seed[1:])
            if kind == "burst":
                jobs = T.burst(t, seed, self.a.burst_scale)
            else:
                cap = self.res["capacity"].get(trace) or {"tokens_per_s": self.a.fallback_capacity,
                                                          "from": "--fallback-capacity"}
                self.res["capacity"].setdefault(trace, cap)
                frac = float(self.a.rates.split(",")[0 if kind == "lo" else 1])
                rates = T.rates_for(t, frac * cap["tokens_per_s"], self.a.http_rate_cap,
                                    self.a.min_jobs * frac / self.a.window_s)
                self.res["rates"][f"{trace}/{kind}"] = {**rates, "fraction": frac}
                jobs = T.open_loop(t, seed, kind, rates, self.a.window_s)
            self.jobs[key] = jobs
            self.res["workload"][key] = T.describe(jobs)
        return self.jobs[key]

    async def warm_up(self, clients: Clients) -> dict:
        """One job of every kind of every trace, at most 16 new tokens each: prefill and decode
        paths, the HTTP proxy and the routers' stats all warm before the first measured phase."""
        jobs = []
        for name, t in self.traces.items():
            d = T.Draw(t, 99, "warmup")
            for j in [d.job("chat", 0.0)] if t.chat else [d.job("interactive", 0.0), d.job("batch", 0.0)]:
                jobs.append(dataclasses.replace(j, max_tokens=min(j.max_tokens, 16),
                                                turns=tuple((u, min(m, 16)) for u, m in j.turns)))
        recs, t0, t1, _ = await run_phase(clients, jobs, self.a.warmup_cap_s)
        await idle()
        return {"wall_s": t1 - t0, "sequences": len(recs), "errors": sorted({r["error"] for r in recs if r["error"]})}

    async def phases(self, name: str, keys: list[str], deadline: float) -> None:
        a, out = self.a, self.res["routers"][name]
        url = f"http://127.0.0.1:{a.port}/v1/completions"
        from ray import serve
        handle = serve.get_app_handle(APP).options(method_name="stream", stream=True)
        async with Clients(url, a.model, handle) as clients:
            await asyncio.sleep(2 * a.stats_period_s)     # every replica's stats reach the router
            out["warmup"] = await self.warm_up(clients)
            before = await idle()
            out["replicas"] = [{k: r.get(k) for k in ("replica", "rank", "captured_buckets", "max_num_seqs",
                                                        "total_blocks", "gpu_ids")} for r in before]
            for key in keys:
                need = self.phase_cap(key) + self.overhead
                if time.time() + need > deadline:
                    self.res["skipped"].append(f"{name} {key} (budget: {deadline - time.time():.0f} s left "
                                               f"of its share, needs {need:.0f})")
                    continue
                jobs = self.jobs_for(key)
                t_start = time.perf_counter()
                ing_before = await counters("OpenAIIngress")
                async with LoopLag() as lag:
                    recs, t0, t_stop, at_stop = await run_phase(clients, jobs, self.phase_cap(key), counters)
                after = await idle()
                generated = replica_delta(before, at_stop)["generated_tokens"] if at_stop else None
                m = phase_metrics(recs, t0, t_stop, replica_delta(before, after), generated)
                ing_after = await counters("OpenAIIngress")
                m.update(lag.summary(), **ingress_latency(ing_before, ing_after), ingress_replicas=len(ing_after))
                m["busy_at_start"] = busy(before)
                before = after
                out["phases"][key] = m
                trace = key.split("/")[0]
                if key.endswith("/burst") and m["tokens"] and trace not in self.res["capacity"]:
                    self.res["capacity"][trace] = {"tokens_per_s": m["tokens_per_s"], "from": f"{name} {key}"}
                self.save()
                spent = time.perf_counter() - t_start
                self.overhead = 0.7 * self.overhead + 0.3 * (spent - (t_stop - t0))
                C.log(f"{name[:4]} {key:14s} tok/s {m['tokens_per_s']:6.0f} ttft50 {C.fmt(m['all']['ttft_ms_p50'], '.0f'):>5}"
                      f" (ingress {C.fmt(m['ingress_first_item_ms_p50'], '.0f'):>4}, arrive {C.fmt(m['replica_arrival_ms_p50'], '.1f')},"
                      f" replica {C.fmt(m['replica_ttft_ms_p50'], '.0f'):>4},"
                      f" lag {C.fmt(m['driver_loop_lag_ms_p50'], '.1f')}) ittft99 {C.fmt(m['interactive']['ttft_ms_p99'], '.0f'):>5} tpot50 {C.fmt(m['all']['tpot_ms_p50'], '.1f'):>4}"
                      f" hit {C.fmt(m['graph_hit'], '.2f')} pfx {C.fmt(m['prefix_hit_rate'], '.2f')} split "
                      f"{':'.join(map(str, m['split']))} cut {m['all']['cut']} err {m['all']['errors']} {spent:.1f}s")

    def segment(self, name: str, keys: list[str], phases_left: int, deploy_est: float) -> float:
        """Deploy `name`, run these phases inside their share of the budget (by phase count),
        delete. A phase whose seed the other router already ran runs only if that one ran it.
        Returns the deploy time."""
        from ray import serve
        share = (self.budget.left() - TAIL_S) * len(keys) / max(phases_left, 1)
        deadline = time.time() + share
        others = [r for r in self.res["routers"] if r != name]
        keys = [k for k in keys if all(k.split("/")[1] not in self.seeds_run.get(r, ()) or
                                       k in self.res["routers"][r]["phases"] for r in others)]
        self.seeds_run.setdefault(name, set()).update(k.split("/")[1] for k in keys)
        if share < deploy_est + 20 or not keys:
            why = f"budget: {share:.0f} s share" if keys else "the other router ran none of them"
            self.res["skipped"].append(f"{name}: a segment of {len(keys)} phases ({why})")
            return deploy_est
        out = self.res["routers"].setdefault(name, {"phases": {}})
        try:
            t = deploy(self.a, name)
            out.setdefault("deploy_s", t)
            out.setdefault("deploys", []).append(t)
            C.log(name, "deployed in", C.rnd(t), "s")
            asyncio.run(self.phases(name, keys, deadline - 10.0))   # ~10 s for the delete
        except Exception as e:  # noqa: BLE001 - keep the other router's numbers
            import traceback
            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {e}"[:400]
        finally:
            serve.delete(APP)
            gpus_free(self.a)
            self.save()
        return out.get("deploys", [deploy_est])[-1]

    def main(self) -> None:
        a = self.a
        C.log("layout", a.layout, "routers", a.routers, "traces", a.traces, "seeds", a.seeds, "->", self.path)
        self.res.update(start_ray(a))
        deploy_est = 40.0 if a.device.startswith("cuda") else 10.0
        order = segments(a, self.plan)
        for i, (name, keys) in enumerate(order):
            deploy_est = self.segment(name, keys, sum(len(k) for _, k in order[i:]), deploy_est)
        self.res["total_s"] = time.time() - C.T0
        self.save()
        print_summary(self.res, self.res["summary"])
        if "ours" in self.res["routers"] and "default" in self.res["routers"]:
            self.res["bar_intervals"] = spread(self.res)      # how sure each bar is (serve_spread.py)
            C.write_json(self.path, self.res)
            print_spread(self.res["bar_intervals"])
        print("wrote", self.path, f"({self.res['total_s']:.0f} s)", flush=True)


def main(argv=None):
    run = Run(parse_args(argv))
    run.main()
    import ray
    ray.shutdown()


if __name__ == "__main__":
    main()
