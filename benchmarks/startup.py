"""Where engine start-up time goes (issue 8, "fast start": ready within 5 s plus the weight read).

Three views of one model's start, on one GPU:
  imports   `python -X importtime -c "import replica.model_runner"` in fresh processes (what the
            engine process imports before its config arrives): total wall time, and the modules
            with the largest cumulative import time. `import torch` alone is timed beside it.
  engine    `replica.Engine` on the process backend, built `--repeats` times: its StartupReport
            (process start, imports, device init, weights, sizing, warm-up, capture, ready) and
            the wall time of the `Engine()` call. The first build may compile Triton kernels;
            later ones find them in the cache, as a restarted replica does.
  bytecode  (--bytecode-runs N) `import torch, triton` as the environment has it and from a
            bytecode cache (the engine process's PYTHONPYCACHEPREFIX where torch ships no .pyc)
  profile   (--profile) the same build on the thread backend under cProfile, in this process
            (torch already imported): the functions with the largest cumulative time, which is
            what names the slow part inside sizing, warm-up and capture.
Prints the ready bar (ready < 5 s + weights read) and writes JSON with the card and date.

  python benchmarks/startup.py --out $OUT/startup.json                # GPU, ~1-2 min for 8B
  python benchmarks/startup.py --device cpu --models tiny --repeats 1   # CPU smoke test
  python benchmarks/startup.py --cold-triton --compile-threads 1,8    # fresh-machine compiles, A/B
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import common as C  # noqa: E402
from benchmarks import roofline as RF  # noqa: E402

IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def import_profile(module: str, top: int) -> dict:
    """Wall time of importing `module` in a fresh interpreter, and its slowest imports (cumulative
    microseconds, with their nesting depth so a reader sees which contain which)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + sys.path[1:])}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = []
    for line in done.stderr.splitlines():
        if m := IMPORT_LINE.match(line):
            rows.append({"module": m.group(4), "cumulative_s": int(m.group(2)) / 1e6,
                         "self_s": int(m.group(1)) / 1e6, "depth": (len(m.group(3)) - 1) // 2})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return {"module": module, "wall_s": wall, "returncode": done.returncode, "top": rows[:top],
            "self_top": sorted(rows, key=lambda r: -r["self_s"])[:top]}


def bytecode_effect(runs: int, prefix: str) -> dict:
    """Wall time of `import torch, triton` in fresh interpreters as the environment has it, and
    with bytecode cached under `prefix` (PYTHONDONTWRITEBYTECODE cleared: the first run writes it),
    what replica.process_worker.bytecode_env gives the engine process where torch has no .pyc."""
    def timed(env: dict) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, triton"], env=env, check=True)
        return time.perf_counter() - t0

    plain = {**os.environ}
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached["PYTHONPYCACHEPREFIX"] = prefix
    return {"dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "plain_s": [timed(plain) for _ in range(runs)],
            "cached_s": [timed(cached) for _ in range(runs + 1)]}   # the first one fills the cache


def python_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def build(model: str, msl: int, device: str, backend: str, extra: dict) -> dict:
    from replica import Engine, EngineConfig
    cfg = EngineConfig(model=model, max_seq_len=msl, device=device, engine_process=backend, **extra)
    t0 = time.perf_counter()
    eng = Engine(cfg)
    wall = time.perf_counter() - t0
    s = eng.stats()
    eng.shutdown()
    C.free_device_memory(device)
    return {"backend": backend, "engine_call_s": wall, "startup": C.stats_dict(s.startup),
            "buckets": len(s.captured_buckets), "max_num_seqs": s.max_num_seqs}


def profiled_build(model: str, msl: int, device: str, extra: dict, top: int) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    rec = build(model, msl, device, "thread", extra)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    rec["profile"] = buf.getvalue().splitlines()
    return rec


def compile_timeline(model: str, msl: int, device: str, extra: dict, threads: str) -> dict:
    """A thread-backend build in this process with an empty TRITON_CACHE_DIR, timing every Triton
    compile (kernel, thread, start and end from the build's start) and C-module build (launchers,
    the driver): which compile is the critical path of start-up's compile-ahead pass."""
    import threading

    import triton.backends.nvidia.driver as tdriver
    import triton.compiler as tcompiler
    events, t0 = [], time.perf_counter()

    def timed(kind, name_of, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter() - t0
            try:
                return fn(*args, **kwargs)
            finally:
                events.append({"kind": kind, "name": name_of(args, kwargs), "start_s": round(start, 3),
                               "end_s": round(time.perf_counter() - t0, 3),
                               "thread": threading.current_thread().name})
        return wrapper

    # Each kernel binds triton.compiler.compile when first used (JITFunction.create_binder), and
    # the CUDA driver imported compile_module_from_src by name: patch both where they are read.
    compile_fn, module_fn = tcompiler.compile, tdriver.compile_module_from_src
    tcompiler.compile = timed("kernel", lambda a, k: a[0].name, compile_fn)
    tdriver.compile_module_from_src = timed("c_module", lambda a, k: k.get("name", "?"), module_fn)
    try:
        with build_env(threads, cold_triton=True):
            rec = build(model, msl, device, "thread", extra)
    finally:
        tcompiler.compile, tdriver.compile_module_from_src = compile_fn, module_fn
    rec["events"] = sorted(events, key=lambda e: e["start_s"])
    for e in rec["events"]:
        C.log(f"  {e['kind']:8s} {e['name']:28s} {e['start_s']:7.3f} -> {e['end_s']:7.3f} s "
              f"({e['end_s'] - e['start_s']:.3f}) {e['thread']}")
    return rec


def import_views(a) -> dict:
    """The import-time views: interpreter start, the engine process's imports, torch alone, and
    (--bytecode-runs) plain vs cached bytecode."""
    rec = {"python_start_s": python_floor(),
           "imports": [import_profile("replica.model_runner", a.top) for _ in range(a.import_runs)],
           "torch_only": [import_profile("torch", 10) for _ in range(a.import_runs)]}
    if a.bytecode_runs:
        with tempfile.TemporaryDirectory() as prefix:
            rec["bytecode"] = bytecode_effect(a.bytecode_runs, prefix)
        C.log("import torch, triton:", {k: [round(x, 2) for x in v] if isinstance(v, list) else v
                                        for k, v in rec["bytecode"].items()})
    C.log("python", f"{rec['python_start_s']:.2f} s; replica.model_runner",
          [round(r["wall_s"], 2) for r in rec["imports"]], "s; torch alone",
          [round(r["wall_s"], 2) for r in rec["torch_only"]], "s")
    for r in rec["imports"][-1]["top"][:12]:
        C.log(f"  {'  ' * r['depth']}{r['module']}: {r['cumulative_s']:.2f} s")
    return rec


@contextlib.contextmanager
def build_env(compile_threads: str, cold_triton: bool) -> Iterator[None]:
    """The engine process's environment for one build: GRAPHSERVE_COMPILE_THREADS (replica/kernels/
    launch.py; "" leaves it unset), and with `cold_triton` a new empty TRITON_CACHE_DIR, as on a
    machine that never ran the engine."""
    saved = {k: os.environ.get(k) for k in ("GRAPHSERVE_COMPILE_THREADS", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory() as cache:
        if compile_threads:
            os.environ["GRAPHSERVE_COMPILE_THREADS"] = compile_threads
        if cold_triton:
            os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def model_views(name: str, a, extra: dict) -> dict:
    """`--repeats` process-backend builds of one model (a preset name or a checkpoint directory)
    per `--compile-threads` value, each with the ready bar, and (--profile) a cProfiled
    thread-backend build."""
    model = f"random:{name}" if name in RF.PRESETS else name
    builds = []
    for _ in range(a.repeats):              # alternate the settings: drift hits each alike
        for threads in a.compile_threads.split(","):
            with build_env(threads, a.cold_triton):
                b = build(model, a.max_seq_len, a.device, "process", extra)
            b.update(compile_threads=threads or "default", cold_triton=a.cold_triton)
            builds.append(b)
    for b in builds:
        st = b["startup"]
        b["ready_bar"] = st["ready_seconds"] < 5.0 + st["load_seconds"]
        C.log(name, "threads", b["compile_threads"], {k: C.rnd(v, 2) for k, v in st.items()
                                                       if k.endswith("seconds")}, "bar", b["ready_bar"])
    rec = {"builds": builds}
    if a.compile_timeline:
        rec["compile_timeline"] = compile_timeline(model, a.max_seq_len, a.device, extra,
                                                   a.compile_threads.split(",")[-1])
    if a.profile:
        rec["profile"] = profiled_build(model, a.max_seq_len, a.device, extra, a.top)
        print("\n".join(rec["profile"]["profile"][:a.top + 12]))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="llama-8b", help="comma list of presets or checkpoint directories")
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--import-runs", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bytecode-runs", type=int, default=0,
                    help="time `import torch, triton` N times plain and N+1 from a bytecode cache")
    ap.add_argument("--compile-threads", default="",
                    help="comma list of GRAPHSERVE_COMPILE_THREADS values, builds alternating "
                         "(e.g. 1,8: compiles one at a time vs eight at once); '' the default")
    ap.add_argument("--cold-triton", action="store_true",
                    help="each build with a new empty TRITON_CACHE_DIR (a fresh machine's compiles)")
    ap.add_argument("--compile-timeline", action="store_true",
                    help="also a cold thread-backend build timing each Triton compile and C build")
    a = ap.parse_args()
    extra = {} if a.device.startswith("cuda") else {"batch_buckets": (1, 2, 4), "block_size": 8}
    out = C.out_path(a.out, "startup.json")
    rec = {"env": C.env_info(a.device), "args": vars(a), **import_views(a), "models": {}}
    for name in a.models.split(","):
        rec["models"][name] = model_views(name, a, extra)
        C.write_json(out, rec)
    C.write_json(out, rec)


if __name__ == "__main__":
    main()
