"""Issue 3's benchmark: the graphserve app under a seeded mixed load, our router vs Ray's default.

One run measures the engine's own batch-1 step time in-process (the rank-0 replica's exact
EngineConfig, `common.served_window`), starts Ray (`ray.init(num_gpus=<detected>)`; on a CPU host 2
fake GPUs and random:tiny CPU engines), then for each router deploys the same app
(`deployments.app:build_app`: 2 LLMReplica, each with the bucket ladder [1..64] as in app.yaml, or
tiers with --bucket-sets 1,2,4,8/16,32,64; KV slots = each tier's largest bucket unless
--max-num-seqs is set, so no replica decodes outside a graph; only `router.request_router_class`
differs) and runs:
  probe  one streaming HTTP client at batch 1 on an idle system (prompt 512, 128 new tokens);
  load   a seeded open-loop mix (Poisson arrivals over --duration-s): interactive requests over
         HTTP streaming (/v1/completions, stream=true), prompt U[64,512] tokens, output U[32,128];
         batch jobs of U[8,64] prompts through the ingress handle's `stream`, prompt U[128,512],
         output U[64,128] per job; greedy, ignore_eos, random byte-token prompts;
  burst  the same distributions, 8 batch jobs + 16 interactive requests all at t=0 (capacity);
         --burst-repeats K runs K bursts (phases burst, burst_2, ...; burst_i drawn with seed+i-1,
         the first from the mix's stream), and the burst bar is judged on their total tokens over
         total wall time.
Per phase and router: tokens/s (output tokens / first arrival .. last token), TTFT and TPOT p50/p99
per sequence (TPOT = (last - first token) / (tokens - 1)), graph-hit rate (decode steps replayed /
all, from the replicas' `counters()` around the phase) and padding waste (padded rows / rows run).
Bars: graph-hit >= 99% with our router (load + bursts); tokens/s >= the default router's (bursts:
capacity; load: an open loop runs near its offered rate, so this ratio is reported too, noise +-2.5%);
probe per-token time within 15% of the engine step time.

  . .gpubundle/activate && python benchmarks/serve_load.py          # 2 GPUs, ~6-8 min
  python benchmarks/serve_load.py --device cpu                      # CPU smoke test, ~1 min
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import common as C  # noqa: E402
from benchmarks.serve_report import bars, load_metrics, print_summary, replica_delta  # noqa: E402

APP = "graphserve"
ROUTERS = {"ours": "router.request_router:BucketAwareRequestRouter",
           "default": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
# (flag, GPU default, CPU smoke default, help)
SIZES = [("model", "random:llama-8b", "random:tiny", "engine model of every replica"),
         ("duration-s", 40.0, 6.0, "arrival window of the open-loop mix"),
         ("interactive-rate", 2.0, 1.0, "interactive HTTP requests per second (Poisson)"),
         ("batch-rate", 0.25, 0.3, "batch jobs per second (Poisson)"),
         ("burst", "8,16", "2,4", "capacity burst: batch jobs, interactive requests, all at t=0"),
         ("batch-size", "8,64", "8,16", "batch job prompts, uniform in [lo,hi]"),
         ("interactive-prompt", "64,512", "16,64", "interactive prompt tokens, uniform"),
         ("interactive-output", "32,128", "4,12", "interactive output tokens, uniform"),
         ("batch-prompt", "128,512", "16,64", "batch-job prompt tokens, uniform"),
         ("batch-output", "64,128", "4,12", "batch-job output tokens (one per job), uniform"),
         ("probe-prompt", 512, 32, "batch-1 probe prompt tokens"),
         ("probe-tokens", 128, 24, "batch-1 probe new tokens")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    C.add_sized_args(ap, SIZES)
    ap.add_argument("--routers", default="ours,default")
    ap.add_argument("--bucket-sets", default="1,2,4,8,16,32,64",
                    help="one set per tier, '/'-separated (e.g. 1,2,4,8/16,32,64)")
    ap.add_argument("--num-replicas", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=0,
                    help="KV slots per replica; 0: each tier's largest bucket (no eager fallback)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--job-timeout-s", type=float, default=180.0, help="a job still running then is an error")
    ap.add_argument("--engine-probe", choices=("first", "off"), default="first")
    ap.add_argument("--burst-repeats", type=int, default=3, help="bursts per router, each freshly drawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if _cuda_count() else "cpu"
    C.fill_sized_args(a, SIZES)
    return a


def _cuda_count() -> int:
    import torch
    return torch.cuda.device_count()


def _range(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


# ---------------------------------------------------------------- the workload

@dataclass(frozen=True)
class Job:
    kind: str                       # "interactive" (HTTP stream) | "batch" (handle stream)
    at: float                       # arrival offset, seconds
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int


def make_workload(a) -> dict[str, list[Job]]:
    """{"load": mix, "burst": burst, "burst_2": ...}, fixed by --seed.
    mix: two independent Poisson streams over [0, duration).
    burst: --burst 'J,I' = J batch jobs and I interactive requests, all arriving at t=0 (capacity)."""
    rng = random.Random(a.seed)
    ip, io, bp, bo, bs = (_range(x) for x in (a.interactive_prompt, a.interactive_output, a.batch_prompt,
                                              a.batch_output, a.batch_size))
    prompt = lambda n: tuple(rng.randrange(256) for _ in range(n))  # noqa: E731 - byte tokens

    def job(kind: str, t: float) -> Job:
        if kind == "interactive":
            return Job(kind, t, (prompt(rng.randint(*ip)),), rng.randint(*io))
        n = rng.randint(*bs)
        return Job(kind, t, tuple(prompt(rng.randint(*bp)) for _ in range(n)), rng.randint(*bo))
    mix = []
    for kind, rate in (("interactive", a.interactive_rate), ("batch", a.batch_rate)):
        t = rng.expovariate(rate) if rate > 0 else a.duration_s
        while t < a.duration_s:
            mix.append(job(kind, t))
            t += rng.expovariate(rate)
    phases = {"load": sorted(mix, key=lambda j: j.at)}
    n_batch, n_inter = _range(a.burst)
    for i in range(a.burst_repeats):
        rng = random.Random(a.seed + i) if i else rng
        phases["burst" if i == 0 else f"burst_{i + 1}"] = \
            [job("batch", 0.0) for _ in range(n_batch)] + [job("interactive", 0.0) for _ in range(n_inter)]
    return phases


def describe(jobs: list[Job]) -> dict:
    return {"jobs": len(jobs), "interactive": sum(j.kind == "interactive" for j in jobs),
            "batch_jobs": sum(j.kind == "batch" for j in jobs), "sequences": sum(len(j.prompts) for j in jobs),
            "output_tokens": sum(len(j.prompts) * j.max_tokens for j in jobs)}


# ---------------------------------------------------------------- clients

async def handle_stream(stream_handle, job: Job) -> list[dict]:
    """A batch job through the ingress handle's `stream`; per-sequence first/last token times."""
    t_send = time.perf_counter()
    seqs: dict[int, dict] = {}
    gen = stream_handle.remote([list(p) for p in job.prompts], max_tokens=job.max_tokens,
                               temperature=0.0, ignore_eos=True)
    async for chunks in gen:
        now = time.perf_counter()
        for c in chunks:
            s = seqs.setdefault(c.index, C.seq_record("batch", t_send, batch=len(job.prompts)))
            if c.token_ids:
                s["t_first"] = s["t_first"] or now
                s["t_last"] = now
                s["tokens"] += len(c.token_ids)
    return list(seqs.values())


async def run_load(jobs: list[Job], a, stream_handle, http) -> tuple[list[dict], float, float]:
    t0 = time.perf_counter()

    async def launch(job: Job):
        await asyncio.sleep(max(0.0, t0 + job.at - time.perf_counter()))
        try:
            if job.kind == "interactive":
                return [await asyncio.wait_for(http(job.prompts[0], job.max_tokens), a.job_timeout_s)]
            return await asyncio.wait_for(handle_stream(stream_handle, job), a.job_timeout_s)
        except Exception as e:  # noqa: BLE001 - a failed or timed-out job is data
            return [C.seq_record(job.kind, time.perf_counter(), error=f"{type(e).__name__}: {e}"[:300])]
    results = await asyncio.gather(*(launch(j) for j in jobs))
    return [s for r in results for s in r], t0, time.perf_counter()


# ---------------------------------------------------------------- deployment and probes

def app_args(a, router: str) -> dict:
    return {"model": a.model, "bucket_sets": [[int(b) for b in t.split(",")] for t in a.bucket_sets.split("/")],
            "max_seq_len": a.max_seq_len, "max_num_seqs": a.max_num_seqs or None, "num_replicas": a.num_replicas,
            "router": {"request_router_class": ROUTERS[router], "request_routing_stats_period_s": 1.0}}


def deploy(a, router: str) -> float:
    from ray import serve
    from deployments.app import build_app
    from deployments.config import AppArgs
    t = time.perf_counter()
    serve.run(build_app(AppArgs(**app_args(a, router))), name=APP, route_prefix="/",
              logging_config={"enable_access_log": False})  # one log line per request drowns the table
    return time.perf_counter() - t


async def counters() -> list[dict]:
    from ray import serve
    h = serve.get_deployment_handle("LLMReplica", app_name=APP)
    return list(await asyncio.wait_for(h.broadcast("counters").results_async(), 60.0))


async def http_probe(a, http) -> dict:
    """One client, batch 1, alone. Per-token time = (last - first token) / (tokens - 1), the mean the
    engine probe reports too; the median gap between events is kept when every token had one."""
    rng, runs = random.Random(a.seed + 7), []
    for _ in range(a.probe_repeats):
        prompt = tuple(rng.randrange(256) for _ in range(a.probe_prompt))
        runs.append(await asyncio.wait_for(http(prompt, a.probe_tokens), a.job_timeout_s))
    ok = [r for r in runs if not r.get("error") and r["t_last"] and r["tokens"] >= 2]
    mean = [(r["t_last"] - r["t_first"]) * 1e3 / (r["tokens"] - 1) for r in ok]
    gaps = [C.percentile(r["gaps"], 50) * 1e3 for r in ok if r["gaps"] and r["events"] >= r["tokens"] - 1]
    return {"per_token_ms": C.percentile(mean, 50) if mean else None, "per_token_ms_runs": mean,
            "gap_median_ms_runs": gaps, "runs": [{k: v for k, v in r.items() if k != "gaps"} for r in runs]}


def engine_probe(a) -> dict:
    """The engine's own batch-1 step time, in this process, with the rank-0 replica's exact
    EngineConfig (AppArgs.engine_config; the latency tier when there are tiers)."""
    from deployments.config import AppArgs
    from replica import Engine
    config = AppArgs(**app_args(a, "ours")).engine_config(0, device="cuda" if a.device.startswith("cuda") else "cpu")
    t = time.perf_counter()
    eng = Engine(config)
    res = {"build_s": time.perf_counter() - t, "buckets": list(config.batch_buckets), "runs": []}
    try:
        asyncio.run(C.served_window(eng, C.engine_requests(1, min(a.probe_prompt, 64), 8, seed=1)))
        for r in range(a.probe_repeats):
            res["runs"].append(asyncio.run(C.served_window(
                eng, C.engine_requests(1, a.probe_prompt, a.probe_tokens, seed=10 + r))))
    finally:
        eng.shutdown()
        del eng
        C.free_device_memory(config.device)
    ms = [r["ms_per_step"] for r in res["runs"] if r.get("ms_per_step")]
    res["ms_per_step"] = C.percentile(ms, 50) if ms else None
    return res


# ---------------------------------------------------------------- the run

async def router_phase(a, phases: dict[str, list[Job]]) -> dict:
    """probe (batch 1, idle), then the open-loop mix, then the bursts; replica counters around each."""
    from ray import serve
    http, close = C.make_http(f"http://127.0.0.1:{a.port}/v1/completions", a.model)
    stream_handle = serve.get_app_handle(APP).options(method_name="stream", stream=True)
    out = {}
    try:
        c0 = await counters()
        out["probe"] = await http_probe(a, http)
        c1 = await counters()
        out["probe"]["decode_steps"] = replica_delta(c0, c1)["decode_steps"]  # which bucket and path served it
        C.log("probe", {k: C.rnd(v) for k, v in out["probe"].items() if k != "runs"})
        for phase, jobs in phases.items():
            seqs, t0, t1 = await run_load(jobs, a, stream_handle, http)
            c2 = await counters()
            delta = replica_delta(c1, c2)
            out[phase] = load_metrics(seqs, t0, t1, delta)
            out[phase]["replicas"] = delta
            out[phase]["errors"] = sorted({s["error"] for s in seqs if s.get("error")})[:5]
            c1 = c2
    finally:
        if close is not None:
            await close()
    return out


def start_ray(a) -> int:
    import ray
    from ray import serve
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    gpus = _cuda_count() if a.device.startswith("cuda") else 2   # CPU: fake GPUs, eager CPU engines
    ray.init(num_gpus=gpus, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    return gpus


def main(argv=None):
    a = parse_args(argv)
    budget, path = C.Budget(a.budget_s), C.out_path(a.out, "serve_load.json")
    phases = make_workload(a)
    res = {"env": C.env_info(a.device), "args": vars(a), "routers": {}, "skipped": [],
           "workload": {name: describe(jobs) for name, jobs in phases.items()}}
    save = lambda: C.write_json(path, res)  # noqa: E731
    C.log("workload", res["workload"])
    if a.engine_probe == "first":
        res["engine_probe"] = engine_probe(a)
        C.log("engine probe b1 ms/step", C.rnd(res["engine_probe"]["ms_per_step"]))
        save()
    from ray import serve
    res["gpus"] = start_ray(a)
    routers, phase_s = a.routers.split(","), 150.0   # a router phase's cost: first a guess, then measured
    for name in routers:
        if not budget.ok(phase_s * 1.1):
            res["skipped"].append(f"{name}: budget ({budget.left():.0f} s left, a phase took {phase_s:.0f} s)")
            continue
        t = time.perf_counter()
        try:
            res["routers"][name] = {"deploy_s": deploy(a, name)}
            C.log(name, "deployed in", C.rnd(res["routers"][name]["deploy_s"]), "s")
            res["routers"][name].update(asyncio.run(router_phase(a, phases)))
            for phase in phases:
                C.log(name, phase, {k: C.rnd(v) for k, v in res["routers"][name][phase].items()
                                    if not isinstance(v, (dict, list))})
        except Exception as e:  # noqa: BLE001 - keep the other router's numbers
            import traceback
            traceback.print_exc()
            res["routers"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:400]
        finally:
            serve.delete(APP)
        phase_s = time.perf_counter() - t
        save()
    res["bars"] = bars(res)
    save()
    print_summary(res)
    print("wrote", path)
    serve.shutdown()


if __name__ == "__main__":
    main()
