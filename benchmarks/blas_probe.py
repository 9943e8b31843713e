"""cuBLAS or cuBLASLt for the engine's GEMMs? Times each layer projection and the lm_head of a
preset at decode and mixed-step row counts under `torch.backends.cuda.preferred_blas_library`
'cublas' and 'cublaslt' (graph-timed, one process, one GPU), and prints each step-sized sum as a
fraction of the 8192^3 bf16 GEMM rate measured in the same run.

`--graphs` times what a choice would change: every bucket's whole decode graph (the engine's
ModelRunner, captured under each library in turn, rows attending --ctx tokens each through real
block tables), alternating the libraries over --repeats engines each.

    python3 benchmarks/blas_probe.py --out $OUT/blas.json            # GPU, ~30 s
    python3 benchmarks/blas_probe.py --graphs --out $OUT/blas_graphs.json   # GPU, ~30 s a model
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks import roofline as RF  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402
from replica.presets import PRESETS  # noqa: E402


def gemm_shapes(p: dict) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of one layer's projections and the lm_head."""
    d, h = p["hidden_size"], p["num_attention_heads"]
    kvh, hd = p.get("num_key_value_heads", h), p.get("head_dim") or d // h
    return {"wqkv": ((h + 2 * kvh) * hd, d), "wo": (d, h * hd), "w13": (2 * p["intermediate_size"], d),
            "w2": (d, p["intermediate_size"]), "lm_head": (p["vocab_size"], d)}


def point_rows_at_blocks(runner, rows: int, ctx: int) -> None:
    """Row i of the runner's decode step feeds one token at position ctx - 1 of its own blocks
    (1 + i * blocks_per_row onward), through real block tables."""
    step, kv, bs = runner.decode, runner.kv, runner.kv.block_size
    per_row = -(-ctx // bs)
    r = torch.arange(rows, device="cuda")
    blocks = 1 + r[:, None] * per_row + torch.arange(per_row, device="cuda")
    kv.block_tables[:rows, :per_row] = blocks.to(torch.int32)
    step.tokens[:rows], step.src[:rows], step.positions[:rows] = 1, -1, ctx - 1
    step.table_rows[:rows], step.steps[:rows] = r, 0
    step.slots[:rows] = blocks[:, -1] * bs + (ctx - 1) % bs


def graph_ms(model: str, lib: str, ctx: int, kv_gib: float) -> dict[int, float]:
    """bucket -> ms per greedy decode-graph replay, for a ModelRunner captured under `lib`. Row i
    of a bucket attends ctx tokens in its own blocks (1 + i * blocks_per_row onward)."""
    from replica.config import EngineConfig
    from replica.model_runner import ModelRunner

    torch.backends.cuda.preferred_blas_library(lib)
    runner = ModelRunner(EngineConfig(model=f"random:{model}", max_seq_len=8192, max_num_seqs=512,
                                      kv_cache_bytes=int(kv_gib * 2**30)))
    kv = runner.kv
    per_row = -(-ctx // kv.block_size)
    out = {}
    for b in runner.graphs.captured_buckets:
        if 1 + b * per_row > kv.num_blocks:
            break
        point_rows_at_blocks(runner, b, ctx)
        for _ in range(3):
            runner.graphs.replay(b, "greedy")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            runner.graphs.replay(b, "greedy")
        end.record()
        torch.cuda.synchronize()
        out[b] = start.elapsed_time(end) / 20
    del runner, kv
    torch.backends.cuda.preferred_blas_library("cublas")
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    return out


def graphs_main(a) -> int:
    rec = dict(env=C.env_info("cuda"), ctx=a.ctx, models={})
    for model in a.models.split(","):
        runs = {"cublas": [], "cublaslt": []}
        for _ in range(a.repeats):
            for lib in ("cublas", "cublaslt"):
                runs[lib].append(graph_ms(model, lib, a.ctx, a.kv_gib))
        buckets = sorted(set(runs["cublas"][0]) & set(runs["cublaslt"][0]))
        best = {lib: {b: min(r[b] for r in rs) for b in buckets} for lib, rs in runs.items()}
        ratio = {b: best["cublaslt"][b] / best["cublas"][b] for b in buckets}
        rec["models"][model] = dict(runs=runs, best=best, lt_vs_cublas=ratio)
        for b in buckets:
            C.log(f"{model:<11} bucket {b:<4} cublas {best['cublas'][b]:7.3f} ms  "
                  f"cublaslt {best['cublaslt'][b]:7.3f} ms  x{ratio[b]:.3f}")
    C.write_json(a.out, rec)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="llama-8b,llama-1b,qwen2-0.5b")
    ap.add_argument("--rows", default="64,256,500,512,2560")
    ap.add_argument("--graphs", action="store_true", help="time whole decode graphs per bucket")
    ap.add_argument("--ctx", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=40.0)
    a = ap.parse_args()
    if a.graphs:
        return graphs_main(a)
    dev, dt = "cuda", torch.bfloat16
    rate = RF.gemm_rate(dev)
    rec = dict(env=C.env_info(dev), gemm_TFLOPs=rate / 1e12, rows=[])
    for model in a.models.split(","):
        p = PRESETS[model]
        shapes = gemm_shapes(p)
        layers = p["num_hidden_layers"]
        ws = {k: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for k, (o, i) in shapes.items()}
        for m in map(int, a.rows.split(",")):
            xs = {i: torch.randn(m, i, device=dev, dtype=dt) for i in {i for _, i in shapes.values()}}
            row = dict(model=model, rows=m)
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                ms = {k: timed_ms(lambda w=w: F.linear(xs[w.shape[1]], w), dev) for k, w in ws.items()}
                step = sum(v * (1 if k == "lm_head" else layers) for k, v in ms.items())
                flop = 2 * m * sum(o * i * (1 if k == "lm_head" else layers) for k, (o, i) in shapes.items())
                row[lib] = dict(ms=ms, step_ms=step, of_gemm_rate=flop / step / 1e9 / (rate / 1e12))
            row["lt_vs_cublas"] = row["cublaslt"]["step_ms"] / row["cublas"]["step_ms"]
            rec["rows"].append(row)
            C.log(f"{model:<11} M={m:<5} cublas {row['cublas']['step_ms']:7.3f} ms "
                  f"({row['cublas']['of_gemm_rate']:.2f} of the rate)  cublaslt {row['cublaslt']['step_ms']:7.3f} ms "
                  f"({row['cublaslt']['of_gemm_rate']:.2f})  lt/cublas x{row['lt_vs_cublas']:.3f}")
        torch.backends.cuda.preferred_blas_library("cublas")
        del ws
        torch.cuda.empty_cache()
    C.write_json(a.out, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
