"""What Ray costs per streamed item, and what stream pacing buys back (deployments/stream_pacing.py).

Two parts, both on CPU (no GPU, no model: the question is Ray's and the front end's, not the GPU's):
  raw   a Serve deployment whose async generator yields as fast as it can, read by N concurrent
        handle streams directly (1 hop) and through a forwarding deployment (2 hops, the ingress's
        shape): items/s delivered;
  app   the graphserve app (deployments.app.build_app, 2 replicas) over a stand-in engine that
        emits one token per sequence every --step-ms (a GPU's decode step), N concurrent handle
        streams of --tokens tokens through the ingress, with pacing off (stream_items_per_s 0: one
        Ray item per step per stream) and on (the default): tokens/s delivered over the ideal
        N x tokens / (tokens x step), items per stream, and time to first token.

  python benchmarks/stream_items.py [--streams 8,64] [--out benchmarks/results/stream_items-cpu-DATE.json]

The numbers are the host's (the dev box has 2 cores; a GPU host's CPUs are faster): the ratios and
the shape carry over, the absolute items/s do not.
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

STEP_S = float(os.environ.get("STREAM_ITEMS_STEP_S", "0.008"))


class SteppingEngine:
    """A stand-in engine (AppArgs.engine_class): one token per sequence every STEP_S seconds."""

    def __init__(self, config):
        self.model_name = config.model
        self._running = 0

    async def generate(self, request):
        from replica.sampling_params import GenerationChunk

        n = request.params.max_tokens
        self._running += 1
        try:
            for i in range(n):
                await asyncio.sleep(STEP_S)
                yield GenerationChunk(request.request_id, (97 + i % 26,), chr(97 + i % 26),
                                      "length" if i == n - 1 else None, prompt_tokens=4,
                                      completion_tokens=i + 1)
        finally:
            self._running -= 1

    def stats(self):
        from replica.stats import EngineStats

        return EngineStats(captured_buckets=(1, 2, 4, 8, 16, 32, 64), graphs=False, max_seq_len=4096,
                           max_num_seqs=512, running=self._running, free_slots=512 - self._running,
                           queued=0, fallback="eager")

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


async def _drain(streams, make) -> tuple[int, float, list[float], list[int]]:
    """Run `streams` streams from `make()` at once: (tokens, seconds, first-token s, items each)."""
    t0 = time.perf_counter()
    firsts, items = [], []

    async def one():
        n_items, tokens, first = 0, 0, None
        async for item in make():
            n_items += 1
            tokens += _tokens_in(item)
            first = first or time.perf_counter() - t0
        firsts.append(first or 0.0)
        items.append(n_items)
        return tokens

    tokens = sum(await asyncio.gather(*(one() for _ in range(streams))))
    return tokens, time.perf_counter() - t0, firsts, items


def _tokens_in(item) -> int:
    """Tokens in one streamed item: the app's list of StreamChunks, or 1 for the raw part's items."""
    if item and hasattr(item[0], "token_ids"):
        return sum(len(c.token_ids) for c in item)
    return 1


def raw_part(serve, counts: list[int], n: int) -> list[dict]:
    @serve.deployment(name="Leaf", max_ongoing_requests=4096)
    class Leaf:
        async def stream(self, k):
            for i in range(k):
                yield [i]

    @serve.deployment(name="Mid", max_ongoing_requests=4096)
    class Mid:
        def __init__(self, leaf):
            self.leaf = leaf.options(method_name="stream", stream=True)

        async def stream(self, k):
            async for x in self.leaf.remote(k):
                yield x

    mid = serve.run(Mid.bind(Leaf.bind()), name="raw", route_prefix=None)
    hops = {"1 hop": serve.get_deployment_handle("Leaf", "raw").options(method_name="stream", stream=True),
            "2 hops": mid.options(method_name="stream", stream=True)}
    rows = []
    for name, h in hops.items():
        for s in counts:
            _, secs, _, _ = asyncio.run(_drain(s, lambda h=h: h.remote(n)))
            rows.append({"part": "raw", "path": name, "streams": s, "items_per_s": s * n / secs})
            print(f"raw {name:6s} {s:4d} streams: {s * n / secs:8.0f} items/s", flush=True)
    serve.delete("raw")
    return rows


def app_part(serve, counts: list[int], tokens: int) -> list[dict]:
    from deployments.app import build_app
    from deployments.config import AppArgs

    rows = []
    for pacing in (0.0, AppArgs.model_fields["stream_items_per_s"].default):
        args = AppArgs(model="random:tiny", num_replicas=2, num_gpus_per_replica=0, batch_buckets=[1, 2, 4, 8],
                       max_seq_len=4096, engine_class="benchmarks.stream_items:SteppingEngine",
                       stream_items_per_s=pacing, max_num_seqs=512, max_ongoing_requests=4096,
                       ingress_max_ongoing_requests=4096)
        h = serve.run(build_app(args), name="gs", route_prefix=None).options(method_name="stream", stream=True)
        asyncio.run(_drain(2, lambda: h.remote([[1, 2, 3]], max_tokens=4)))     # warm-up
        for s in counts:
            got, secs, firsts, items = asyncio.run(_drain(s, lambda: h.remote([[1, 2, 3]], max_tokens=tokens)))
            ideal = s * tokens / (tokens * STEP_S)
            row = {"part": "app", "stream_items_per_s": pacing, "streams": s, "tokens": got,
                   "tokens_per_s": got / secs, "of_ideal": got / secs / ideal,
                   "items_per_stream": sum(items) / len(items), "ttft_p50_ms": 1e3 * C.percentile(firsts, 50)}
            rows.append(row)
            print(f"app pacing {pacing:5.0f} {s:4d} streams: {row['tokens_per_s']:7.0f} tok/s = "
                  f"{row['of_ideal']:.2f} of ideal, {row['items_per_stream']:.0f} items/stream, "
                  f"TTFT p50 {row['ttft_p50_ms']:.0f} ms", flush=True)
        serve.delete("gs")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="8,64")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--out")
    a = ap.parse_args()
    counts = [int(x) for x in a.streams.split(",")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    import ray
    from ray import serve

    ray.init(num_cpus=max(os.cpu_count() or 2, 4), num_gpus=0, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"STREAM_ITEMS_STEP_S": str(STEP_S)}})
    try:
        rows = raw_part(serve, counts, a.tokens) + app_part(serve, counts, a.tokens)
    finally:
        serve.shutdown()
        ray.shutdown()
    app = {(r["stream_items_per_s"], r["streams"]): r for r in rows if r["part"] == "app"}
    paced_over_unpaced = {s: app[(p, s)]["tokens_per_s"] / app[(0.0, s)]["tokens_per_s"]
                          for (p, s) in app if p}
    print("tokens/s paced / unpaced:", {s: round(v, 2) for s, v in paced_over_unpaced.items()})
    if a.out:
        res = {"env": {**C.env_info("cpu"), "cpus": os.cpu_count()}, "args": vars(a), "step_s": STEP_S,
               "rows": rows, "paced_over_unpaced_tokens_per_s": paced_over_unpaced}
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
