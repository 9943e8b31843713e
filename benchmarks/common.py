"""Shared helpers of the benchmarks: the run record, the time budget, timing, tables.

Contract
- The bounds results are read against (the decode floor, the roofline, the work floor) and the
  device rates they use are in benchmarks/roofline.py.
- `Budget` guards the 10-minute GPU command: `ok(reserve_s)` is False once less than `reserve_s` is left.
- `served_window(engine, requests)` times an in-process `replica.Engine` the way a server sees it:
  the window from the last request's first token to the first request's last token (all rows
  decoding), divided by the engine's own decode-step counters over that window.
- Nothing here imports ray, and torch only inside the functions that need a device.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from typing import Any, Iterable, Optional, Sequence


T0 = time.time()


def log(*args: Any) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def out_path(arg: Optional[str], name: str) -> str:
    """--out if given, else $OUT/<name>, else ./benchmarks/results/<name>."""
    if arg:
        return arg
    base = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, name)


# A result larger than this is written without indentation (serve_load's per-request records run
# to ~1 MB indented): result files travel with the tree to the GPU machines, which cap its size.
COMPACT_JSON_BYTES = 200_000


def write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=1, default=str)
    if len(text) > COMPACT_JSON_BYTES:
        text = json.dumps(obj, separators=(",", ":"), default=str)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class Budget:
    """Wall-clock guard for one GPU command. `ok(reserve_s)`: True while more than reserve_s is left."""

    def __init__(self, total_s: float, start: Optional[float] = None):
        self.total_s, self.start = total_s, T0 if start is None else start

    def left(self) -> float:
        return self.total_s - (time.time() - self.start)

    def ok(self, reserve_s: float = 0.0) -> bool:
        return self.left() > reserve_s


def add_sized_args(ap, sizes) -> None:
    """sizes: (flag, GPU default, CPU smoke default, help); the default is picked by `fill_sized_args`."""
    for flag, gpu, cpu, h in sizes:
        ap.add_argument("--" + flag, type=type(gpu), default=None, help=f"{h} (GPU {gpu}; CPU smoke {cpu})")


def fill_sized_args(a, sizes) -> None:
    """Every sized flag left unset takes its GPU default when a.device is CUDA, else its CPU one."""
    for flag, gpu, cpu, _ in sizes:
        if getattr(a, flag.replace("-", "_")) is None:
            setattr(a, flag.replace("-", "_"), gpu if a.device.startswith("cuda") else cpu)


def ge(x: Optional[float], bar: float) -> Optional[bool]:
    """x >= bar, or None when x was not measured."""
    return None if x is None else x >= bar


# ---------------------------------------------------------------- environment and device

def env_info(device: str) -> dict:
    """Card, library versions and date for the run record."""
    import torch
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        info["card_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["card"] = "cpu"
    return info


def sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free_device_memory(device) -> None:
    gc.collect()
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def cuda_mem_gb(device) -> Optional[float]:
    import torch
    return round(torch.cuda.memory_allocated() / 1e9, 2) if str(device).startswith("cuda") else None


# ---------------------------------------------------------------- statistics and tables

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not (v := sorted(values)):
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rnd(x: Any, nd: int = 3) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def print_table(rows: Iterable[dict], cols: Sequence[tuple[str, str, int]]) -> None:
    """cols: (key, header, width). Missing values print as '-'."""
    rows = list(rows)
    print(" ".join(h.rjust(w) for _, h, w in cols))
    for r in rows:
        print(" ".join(fmt(r.get(k)).rjust(w) for k, _, w in cols))
    sys.stdout.flush()


# ---------------------------------------------------------------- engine stats

def stats_dict(stats: Any) -> dict:
    """An EngineStats (or any dataclass/dict) as JSON-safe data: tuple keys become 'bucket:path'."""
    import dataclasses
    if dataclasses.is_dataclass(stats):
        d = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    elif isinstance(stats, dict):
        d = dict(stats)
    else:
        d = {k: v for k, v in vars(stats).items() if not k.startswith("_")}
    return {k: _json_safe(v) for k, v in d.items()}


def _json_safe(v: Any) -> Any:
    import dataclasses
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return stats_dict(v)
    if isinstance(v, dict):
        return {(":".join(map(str, k)) if isinstance(k, tuple) else str(k)): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def decode_steps(stats: Any) -> dict[tuple[int, str], int]:
    """EngineStats.decode_steps as {(bucket, path): count} (accepts the JSON form 'b:path' too)."""
    raw = getattr(stats, "decode_steps", None)
    if raw is None and isinstance(stats, dict):
        raw = stats.get("decode_steps")
    out: dict[tuple[int, str], int] = {}
    for k, v in (raw or {}).items():
        if isinstance(k, str):
            b, _, path = k.partition(":")
            k = (int(b), path)
        out[(int(k[0]), str(k[1]))] = int(v)
    return out


def diff_steps(after: dict, before: dict) -> dict[str, int]:
    """Per (bucket, path) decode steps run between two snapshots, as {'bucket:path': n}, n > 0."""
    keys = set(after) | set(before)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {f"{k[0]}:{k[1]}": n for k, n in sorted(d.items()) if n > 0}


def graph_hit_rate(steps: dict) -> Optional[float]:
    """Decode steps run by graph replay / all decode steps; keys (bucket, path) or 'bucket:path'."""
    total = graph = 0
    for k, n in steps.items():
        path = k[1] if isinstance(k, tuple) else str(k).partition(":")[2]
        total += n
        graph += n if path == "graph" else 0
    return graph / total if total else None


# ---------------------------------------------------------------- driving an in-process engine

def engine_requests(B: int, P: int, new: int, seed: int):
    from replica import GenerationRequest, SamplingParams
    import torch
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, P), generator=gen).tolist()  # byte ids: valid for every preset
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(prompt_token_ids=row, params=sp, request_id=f"bench-{seed}-{i}")
            for i, row in enumerate(ids)]


async def served_window(engine, reqs, timeout_s: float = 300.0) -> dict:
    """Run all requests concurrently; window = last first token .. first finish (all B decoding).
    Raises TimeoutError (requests aborted) after timeout_s: a stuck engine must not eat the GPU slot."""
    B, times, win = len(reqs), [[] for _ in reqs], {}
    started, reasons = set(), []

    def snap(key):
        for _ in range(5):  # the step thread may add a counter key while we copy: retry
            try:
                win[key] = (time.perf_counter(), decode_steps(engine.stats()))
                return
            except RuntimeError:
                continue

    async def one(i, req):
        async for ch in engine.generate(req):
            n = len(ch.token_ids)
            if n:
                times[i].append((time.perf_counter(), n))
                if i not in started:
                    started.add(i)
                    if len(started) == B:
                        snap("start")
            if ch.finish_reason is not None:
                reasons.append(ch.finish_reason)
                if "start" in win and "end" not in win:
                    snap("end")
                    win["first_done"] = i
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i, r) for i, r in enumerate(reqs))), timeout_s)
    out = {"wall_s": time.perf_counter() - t0, "tokens": sum(n for ts in times for _, n in ts),
           "finish_reasons": sorted(set(reasons))}
    if "start" not in win or "end" not in win:
        return out
    (ta, sa), (tb, sb) = win["start"], win["end"]
    steps = diff_steps(sb, sa)
    n_steps = sum(steps.values())
    out.update(window_s=tb - ta, window_steps=steps, graph_hit=graph_hit_rate(steps))
    if n_steps:
        out["ms_per_step"] = (tb - ta) * 1e3 / n_steps
    chunks = [(t, n) for t, n in times[win["first_done"]] if t > ta]  # the chunk-based count
    if len(chunks) >= 2:
        out["ms_per_step_chunks"] = (chunks[-1][0] - chunks[0][0]) * 1e3 / sum(n for _, n in chunks[1:])
        out["window_tokens"] = sum(n for _, n in chunks)
    return out


# ---------------------------------------------------------------- client-side records

def seq_record(kind: str, t_send: float, first=None, last=None, tokens: int = 0, **kw) -> dict:
    """One sequence as a client saw it (perf_counter seconds)."""
    return {"kind": kind, "t_send": t_send, "t_first": first, "t_last": last, "tokens": tokens, **kw}


def seq_metrics(seqs: list[dict]) -> dict:
    """Count, tokens, TTFT and TPOT p50/p99 (ms) of seq_records; errors are counted, not timed."""
    ok = [s for s in seqs if not s.get("error") and s["t_first"] is not None]
    ttft = [s["t_first"] - s["t_send"] for s in ok]
    tpot = [(s["t_last"] - s["t_first"]) / (s["tokens"] - 1) for s in ok if s["tokens"] > 1 and s["t_last"]]
    ms = lambda v, q: None if not v else percentile(v, q) * 1e3  # noqa: E731
    return {"sequences": len(seqs), "errors": len(seqs) - len(ok), "tokens": sum(s["tokens"] for s in ok),
            "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99),
            "tpot_ms_p50": ms(tpot, 50), "tpot_ms_p99": ms(tpot, 99)}
