"""Where a decode step's time goes at each bucket size: one layer's ops timed alone, per bucket.

For a preset's shapes (random weights, bf16) and every ladder bucket up to --max-rows, this times
the four GEMMs of a layer (wqkv, wo, w13, w2), the lm_head GEMM and the paged decode attention at
--ctx tokens per row, each captured in a CUDA graph (launch cost excluded), and adds them up as a
step: layers x (GEMMs + attention) + lm_head. It flags every bucket whose step is slower than a
larger bucket's (a batch of that size would finish sooner padded to the larger bucket), and the
GEMM among the ops that makes it so.

Why: in every engine_capacity run, llama-8b's 448-row decode step took 22-23 ms against 20-22 ms
at 512 rows (results/engine_capacity-*.json, decode_step_ms), while llama-1b's did not.

    python3 benchmarks/decode_shapes.py --model llama-8b --out $OUT/decode_shapes.json   # GPU, ~1 min
    python3 benchmarks/decode_shapes.py --model tiny --device cpu                        # CPU smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402

from replica import kernels as K  # noqa: E402
from replica.config import LADDER  # noqa: E402
from replica.presets import PRESETS  # noqa: E402


def timed_ms(fn, device: str, calls: int = 10, replays: int = 20) -> float:
    """Milliseconds per call of fn(): graph-captured `calls` times and replayed on CUDA, eager on CPU."""
    if device == "cpu":
        fn()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                                    # compile and allocate outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def layer_ops(p: dict, rows: int, ctx: int, block_size: int, device: str, dtype) -> dict:
    """Milliseconds of each op of one layer (and the lm_head) at `rows` decode rows."""
    d, inter, h, kvh = p["hidden_size"], p["intermediate_size"], p["num_attention_heads"], p["num_key_value_heads"]
    hd = d // h
    w = lambda o, i: torch.randn(o, i, device=device, dtype=dtype) * 0.02   # noqa: E731
    x = torch.randn(rows, d, device=device, dtype=dtype)
    gemms = {"wqkv": (x, w((h + 2 * kvh) * hd, d)), "wo": (x, w(d, h * hd)),
             "w13": (x, w(2 * inter, d)), "w2": (torch.randn(rows, inter, device=device, dtype=dtype), w(d, inter)),
             "lm_head": (x, w(p["vocab_size"], d))}
    ms = {name: timed_ms(lambda a=a, b=b: F.linear(a, b), device) for name, (a, b) in gemms.items()}
    per_row = -(-ctx // block_size)
    blocks = rows * per_row + 1
    k = torch.randn(blocks, kvh, block_size, hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.randperm(blocks - 1, device=device)[:rows * per_row].view(rows, per_row).to(torch.int32)
    q = torch.randn(rows, h, hd, device=device, dtype=dtype)
    table_rows = torch.arange(rows, device=device)
    lens = torch.full((rows,), ctx, device=device, dtype=torch.long)
    ms["attention"] = timed_ms(lambda: K.paged_decode_attention(q, k, v, tables, table_rows, lens, hd ** -0.5), device)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-8b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ctx", type=int, default=512, help="tokens of context per row")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--out")
    a = ap.parse_args()
    p = PRESETS[a.model]
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    buckets = [b for b in LADDER if b <= a.max_rows]
    rows = []
    for b in buckets:
        ms = layer_ops(p, b, a.ctx, a.block_size, a.device, dtype)
        layer = sum(v for k, v in ms.items() if k != "lm_head")
        rows.append({"rows": b, "ms": {k: round(v, 4) for k, v in ms.items()},
                     "step_ms": round(p["num_hidden_layers"] * layer + ms["lm_head"], 3)})
        C.log(f"{b:4d} rows: step {rows[-1]['step_ms']:7.3f} ms  " +
              "  ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    for i, r in enumerate(rows):   # a bucket slower than some larger one, and the op most to blame
        faster = [s for s in rows[i + 1:] if s["step_ms"] < r["step_ms"]]
        if faster:
            s = min(faster, key=lambda s: s["step_ms"])
            worst = max(r["ms"], key=lambda k: r["ms"][k] - s["ms"][k])
            r["dominated_by"] = {"rows": s["rows"], "step_ms": s["step_ms"], "op": worst}
            C.log(f"{r['rows']} rows ({r['step_ms']:.2f} ms) is slower than {s['rows']} rows "
                  f"({s['step_ms']:.2f} ms); most of it in {worst}")
    rec = {"env": C.env_info(a.device), "model": a.model, "ctx": a.ctx, "block_size": a.block_size,
           "dtype": str(dtype), "buckets": rows}
    C.write_json(C.out_path(a.out, "decode_shapes.json"), rec)


if __name__ == "__main__":
    main()
