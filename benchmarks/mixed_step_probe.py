"""Where an eager mixed step's time goes: host launch time against GPU time, per step shape.

A mixed step (prompt chunks, with decode rows riding along) runs eagerly: every kernel of every
layer is launched from Python. When the host takes longer to launch a step than the GPU takes to
run it, the step is host-bound, and that is what a chat turn's first token waits on under light
load. For each preset and each shape (prompt tokens in one chunk, decode rows beside it) this
times, on the engine's own model and KV cache (`EngineCore`, scratch block-table row):
- `host_ms`: the Python call that launches the step (no sync inside: launches are asynchronous);
- `wall_ms`: launch plus `synchronize()`: the step's time as the engine sees it;
- `gpu_ms`: CUDA events around the same launches, after a 5 ms spin so that the GPU runs behind
  the host and its time is its own (the events bracket the kernels, not the host's gaps);
- `graph_decode_ms`: the decode graph at the bucket of the same row count, for scale;
- `piecewise_graphs`: the same three times through replica/mixed_graphs.py, where the step fits a
  captured size (the engine's path for it since session 9);
and one cProfile of `--profile-calls` launches of the first shape, top functions by own time.

    python3 benchmarks/mixed_step_probe.py --models llama-1b,llama-8b --out $OUT/mixed_step.json   # GPU
    python3 benchmarks/mixed_step_probe.py --models tiny --device cpu                               # CPU smoke
"""
from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402

from replica import EngineConfig  # noqa: E402
from replica import kernels as K  # noqa: E402
from replica.worker import EngineCore  # noqa: E402


def mixed_inputs(core: EngineCore, prompt: int, decode_rows: int):
    """Inputs of one mixed step: `decode_rows` 1-token chunks, then one prompt chunk of `prompt`
    tokens, all on the scratch table row (timing only: the values are never read back)."""
    r, dev = core.runner, core.runner.device
    q_lens = [1] * decode_rows + ([prompt] if prompt else [])
    kv_lens = [64] * decode_rows + ([prompt] if prompt else [])
    n = sum(q_lens)
    tokens = torch.zeros(n, dtype=torch.long, device=dev)
    positions = torch.cat([torch.full((decode_rows,), 63, device=dev)] +
                          ([torch.arange(prompt, device=dev)] if prompt else []))
    slots = torch.zeros(n, dtype=torch.long, device=dev)
    meta_args = (q_lens, kv_lens, [r.kv.scratch_row] * len(q_lens), dev)
    last_rows = torch.tensor(list(itertools.accumulate(q_lens)), device=dev) - 1
    return tokens, positions, slots, meta_args, last_rows


def launch(core: EngineCore, inputs, graphs: bool = False) -> torch.Tensor:
    """One mixed step as `ModelRunner._run_mixed` launches it (tile map built on the host): eager,
    or (`graphs`) through the piecewise mixed-step graphs at the smallest captured size."""
    tokens, positions, slots, meta_args, last_rows = inputs
    meta = K.PrefillMeta.build(*meta_args)
    r = core.runner
    if graphs:
        return r.mixed.run(r.mixed.fits(len(tokens)), tokens, positions, slots, meta, last_rows)
    return r.model.forward_mixed(tokens, positions, slots, meta, r.kv, last_rows)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_shape(core: EngineCore, prompt: int, decode_rows: int, reps: int, graphs: bool = False) -> dict:
    dev = core.runner.device
    inputs = mixed_inputs(core, prompt, decode_rows)
    for _ in range(3):
        launch(core, inputs, graphs)              # compile and warm outside the timing
    sync(dev)
    host, wall, gpu = [], [], []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        launch(core, inputs, graphs)
        t1 = time.perf_counter()
        sync(dev)
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
        if dev.type == "cuda":                    # the GPU's own time: host runs ahead of it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(5e-3 * 1.5e9))  # ~5 ms of spin at ~1.5 GHz
            start.record()
            launch(core, inputs, graphs)
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3)
    ms = lambda xs: round(statistics.median(xs) * 1e3, 3) if xs else None  # noqa: E731
    rec = {"prompt_tokens": prompt, "decode_rows": decode_rows, "host_ms": ms(host),
           "wall_ms": ms(wall), "gpu_ms": ms(gpu)}
    rec["host_bound"] = bool(gpu) and rec["host_ms"] > rec["gpu_ms"]
    return rec


def graph_decode_ms(core: EngineCore, rows: int, reps: int) -> float:
    g, dev = core.runner.graphs, core.runner.device
    b = g.bucket_for(rows) or rows
    g.replay(b, "greedy")
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay(b, "greedy")
    sync(dev)
    return round((time.perf_counter() - t0) / reps * 1e3, 3)


def host_profile(core: EngineCore, prompt: int, decode_rows: int, calls: int, top: int) -> list:
    """Top functions by own time over `calls` launches (no sync inside: launch cost only)."""
    inputs = mixed_inputs(core, prompt, decode_rows)
    launch(core, inputs)
    sync(core.runner.device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        launch(core, inputs)
    prof.disable()
    sync(core.runner.device)
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (fn, line, name), (_, ncalls, tottime, cumtime, _) in st.stats.items():
        rows.append({"function": f"{os.path.basename(fn)}:{line}:{name}", "calls_per_step": ncalls / calls,
                     "own_ms_per_step": round(tottime / calls * 1e3, 3),
                     "cum_ms_per_step": round(cumtime / calls * 1e3, 3)})
    return sorted(rows, key=lambda r: -r["own_ms_per_step"])[:top]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="16:0,64:8,256:0,256:32,1024:64,2048:0",
                    help="prompt_tokens:decode_rows, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile-calls", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(":")) for s in a.shapes.split(",")]
    cuda = a.device.startswith("cuda")
    extra = {} if cuda else {"batch_buckets": (1, 2, 4, 8), "engine_process": "thread"}
    results = []
    for model in a.models.split(","):
        core = EngineCore(EngineConfig(model=f"random:{model}", device=a.device, max_seq_len=4096, **extra))
        rec = {"model": model, "layers": core.runner.model.shape.num_layers, "shapes": [],
               "mixed_graph_sizes": list(core.runner.mixed.sizes),
               "startup": C.stats_dict(core.runner.startup)}
        with torch.inference_mode():
            for prompt, rows in shapes:
                r = time_shape(core, prompt, rows, a.reps)
                r["graph_decode_ms_same_rows"] = graph_decode_ms(core, max(1, rows), a.reps)
                C.log(f"{model} {prompt} prompt + {rows} decode rows: host {r['host_ms']} ms, gpu {r['gpu_ms']} ms, "
                      f"wall {r['wall_ms']} ms; decode graph at {max(1, rows)} rows {r['graph_decode_ms_same_rows']} ms")
                if core.runner.mixed.fits(prompt + rows):
                    r["piecewise_graphs"] = g = time_shape(core, prompt, rows, a.reps, graphs=True)
                    C.log(f"    piecewise graphs at {core.runner.mixed.fits(prompt + rows)} tokens: host "
                          f"{g['host_ms']} ms, gpu {g['gpu_ms']} ms, wall {g['wall_ms']} ms "
                          f"(x{r['wall_ms'] / g['wall_ms']:.2f} faster)")
                rec["shapes"].append(r)
            rec["host_profile"] = host_profile(core, *shapes[0], a.profile_calls, 25)
        for p in rec["host_profile"][:12]:
            C.log(f"    {p['own_ms_per_step']:8.3f} ms own {p['cum_ms_per_step']:8.3f} cum "
                  f"x{p['calls_per_step']:<6g} {p['function']}")
        results.append(rec)
        del core
        C.free_device_memory(a.device)
    C.write_json(C.out_path(a.out, "mixed_step_probe.json"), {"env": C.env_info(a.device), "results": results})


if __name__ == "__main__":
    main()
