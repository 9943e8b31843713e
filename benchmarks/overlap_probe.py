"""Can decode attention run beside the GEMMs? Per-layer time of a decode step's ops, three ways.

A decode step at 512 rows of llama-8b is 32 x (four GEMMs, compute-bound, ~0.31 ms + paged attention,
bandwidth-bound, ~0.27 ms): run one after the other, each kind leaves the other's resource idle
(results/decode_shapes-8b-h200-2026-11-30.json). Two half-batches on two streams did not overlap
(session 7, commit 5db5057): cuBLAS's GEMMs take every SM. This probe asks whether leaving SMs to
attention (torch's experimental cuBLAS SM carveout, which only the cuBLASLt path honours) buys the
overlap, before the engine is changed for it. For `--layers` layers of one preset's shapes (random
weights, bf16, the engine's own kernels), graph-captured, it times per layer:
- `serial`: the whole batch, op after op (today's decode step), with cuBLAS and with cuBLASLt;
- `halves`: two half-batches, each its own op chain on its own stream (forked and joined);
- `pipelined`: two half-batches, every GEMM on one stream and every attention on another, so that
  one half's attention runs while the other half's GEMMs do: the schedule NanoFlow-style overlap
  needs;
each with the GEMMs' SM carveout at every value of --carveouts (SMs left out of the GEMMs).
RMSNorm, RoPE and the residual adds are left out: small, and the same in every variant.

    python3 benchmarks/overlap_probe.py --model llama-8b --out $OUT/overlap_probe.json   # GPU, ~1 min
    python3 benchmarks/overlap_probe.py --model tiny --device cpu --rows 8                # CPU smoke
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402

from replica import kernels as K  # noqa: E402
try:
    from replica.kernels import paged_attention as PA  # noqa: E402
except ImportError:  # no triton: the CPU path uses the reference attention
    PA = None
from replica.presets import PRESETS  # noqa: E402


class Layer:
    """One layer's weights and a KV pool with `ctx` tokens for each of `rows` rows."""

    def __init__(self, p: dict, rows: int, ctx: int, block_size: int, device: str, dtype):
        d, inter = p["hidden_size"], p["intermediate_size"]
        self.h, self.kvh = p["num_attention_heads"], p["num_key_value_heads"]
        self.hd = d // self.h
        w = lambda o, i: torch.randn(o, i, device=device, dtype=dtype) * 0.02   # noqa: E731
        self.wqkv, self.wo = w((self.h + 2 * self.kvh) * self.hd, d), w(d, self.h * self.hd)
        self.w13, self.w2 = w(2 * inter, d), w(d, inter)
        per_row = -(-ctx // block_size)
        blocks = rows * per_row + 1
        self.k = torch.randn(blocks, self.kvh, block_size, self.hd, device=device, dtype=dtype)
        self.v = torch.randn_like(self.k)
        self.tables = torch.randperm(blocks - 1, device=device)[:rows * per_row].view(rows, per_row).to(torch.int32)
        self.lens = torch.full((rows,), ctx, device=device, dtype=torch.long)
        self.table_rows = torch.arange(rows, device=device)

    def qkv(self, x):                                   # [N, D] -> q [N, H, hd]
        q = F.linear(x, self.wqkv)[:, :self.h * self.hd]
        return q.reshape(x.shape[0], self.h, self.hd).contiguous()

    def attend(self, q, lo: int, **knobs):              # rows lo..lo+N of the pool
        # knobs (GPU only): paged_attention's programs / num_warps / num_stages / block_n
        n = q.shape[0]
        args = (q, self.k, self.v, self.tables, self.table_rows[lo:lo + n], self.lens[lo:lo + n],
                self.hd ** -0.5)
        if knobs and q.is_cuda:
            return PA.paged_decode_attention(*args, **knobs)
        return K.paged_decode_attention(*args)

    def kv_bytes(self) -> int:
        """K and V bytes one attention call over every row reads."""
        return 2 * int(self.lens.sum()) * self.kvh * self.hd * self.k.element_size()

    def post(self, a):                                  # attention out [N, H, hd] -> next x [N, D]
        x = F.linear(a.reshape(a.shape[0], -1), self.wo)
        return F.linear(K.silu_mul(F.linear(x, self.w13)), self.w2)


def serial(layer: Layer, x, layers: int, lo: int = 0, **knobs):
    """The op chain over rows lo .. lo + len(x) of the pool."""
    for _ in range(layers):
        x = layer.post(layer.attend(layer.qkv(x), lo, **knobs))
    return x


def halves(layer: Layer, x, layers: int, side):
    """Each half its own chain; the second half's on `side` (CPU: one after the other).
    Returns the halves' outputs."""
    h = x.shape[0] // 2
    if side is None:
        return serial(layer, x[:h], layers), serial(layer, x[h:], layers, h)
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        b = serial(layer, x[h:], layers, h)
    a = serial(layer, x[:h], layers)
    main.wait_stream(side)
    return a, b


def pipelined(layer: Layer, x, layers: int, side, **knobs):
    """GEMMs on the current stream, attention on `side`: half A's attention beside half B's GEMMs
    and the other way round. Every tensor stays referenced until the end (no cross-stream reuse).
    knobs go to the attention (a persistent grid confined to the SMs the GEMMs leave free)."""
    h = x.shape[0] // 2
    if side is None:
        return halves(layer, x, layers, None)
    main, keep = torch.cuda.current_stream(), []

    def mark(stream):
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    qa = layer.qkv(x[:h])
    qa_ready = mark(main)
    qb = layer.qkv(x[h:])
    qb_ready = mark(main)
    for i in range(layers):
        side.wait_event(qa_ready)
        with torch.cuda.stream(side):
            oa = layer.attend(qa, 0, **knobs)
        oa_ready = mark(side)
        side.wait_event(qb_ready)
        with torch.cuda.stream(side):
            ob = layer.attend(qb, h, **knobs)
        ob_ready = mark(side)
        keep += [qa, qb, oa, ob]
        main.wait_event(oa_ready)
        xa = layer.post(oa)
        if i < layers - 1:
            qa = layer.qkv(xa)
            qa_ready = mark(main)
        main.wait_event(ob_ready)
        xb = layer.post(ob)
        if i < layers - 1:
            qb = layer.qkv(xb)
            qb_ready = mark(main)
        keep += [xa, xb]
    main.wait_stream(side)
    return keep


@contextmanager
def blas(backend: str, carveout):
    """cuBLAS backend and GEMM SM carveout for the captures inside (read at each GEMM's launch)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(backend)
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(before)


ATTENTION_CONFIGS = {"w4s2n64": dict(num_warps=4, num_stages=2, block_n=64),   # the engine's
                     "w8s3n64": dict(num_warps=8, num_stages=3, block_n=64),
                     "w8s4n64": dict(num_warps=8, num_stages=4, block_n=64),
                     "w8s3n128": dict(num_warps=8, num_stages=3, block_n=128)}


def persistent_sweep(layer: Layer, x, a, rec: dict) -> dict:
    """Attention alone as a persistent grid of P programs: the bandwidth P SMs reach (GB/s), per
    launch config. Returns the best config for each P."""
    q = layer.qkv(x)
    gbps, best = {}, {}
    for progs in a.programs:
        for name, cfg in ATTENTION_CONFIGS.items():
            ms = timed_ms(lambda: layer.attend(q, 0, programs=progs, **cfg), a.device)
            gbps[f"p{progs}/{name}"] = round(layer.kv_bytes() / ms / 1e6, 1)
        best[progs] = max(ATTENTION_CONFIGS, key=lambda n: gbps[f"p{progs}/{n}"])
    ms = timed_ms(lambda: layer.attend(q, 0), a.device)
    gbps["grid/engine"] = round(layer.kv_bytes() / ms / 1e6, 1)
    rec["attention_gbps"] = gbps
    return best


def measure(layer: Layer, x, a, side) -> dict:
    """Per-layer ms of every variant at one row count (vs_serial: over cuBLAS's serial step)."""
    cuda = side is not None
    per_layer = lambda fn: timed_ms(fn, a.device) / a.layers   # noqa: E731
    rec = {"rows": x.shape[0], "ms_per_layer": {}}
    ops = {"qkv": lambda: layer.qkv(x), "attention": lambda: layer.attend(layer.qkv(x), 0),
           "post": lambda: layer.post(layer.attend(layer.qkv(x), 0))}
    rec["ops_ms"] = {k: round(timed_ms(fn, a.device), 4) for k, fn in ops.items()}
    ms = rec["ms_per_layer"]
    for backend in (["cublas", "cublaslt"] if cuda else ["default"]):
        with blas(backend, None):
            ms[f"serial/{backend}"] = per_layer(lambda: serial(layer, x, a.layers))
    best = persistent_sweep(layer, x, a, rec) if cuda else {}
    for carve in (a.carveouts if cuda else [0]):
        with blas("cublaslt", carve or None):
            ms[f"halves/lt/carve{carve}"] = per_layer(lambda: halves(layer, x, a.layers, side))
            ms[f"pipelined/lt/carve{carve}"] = per_layer(lambda: pipelined(layer, x, a.layers, side))
            if carve in best:      # attention confined to the `carve` SMs the GEMMs leave free
                cfg = ATTENTION_CONFIGS[best[carve]]
                ms[f"pipelined/lt/carve{carve}/persistent-{best[carve]}"] = per_layer(
                    lambda: pipelined(layer, x, a.layers, side, programs=carve, **cfg))
    base = ms[f"serial/{'cublas' if cuda else 'default'}"]
    rec["ms_per_layer"] = {k: round(v, 4) for k, v in ms.items()}
    rec["vs_serial"] = {k: round(v / base, 3) for k, v in ms.items()}
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-8b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--ctx", type=int, default=512, help="tokens of context per row")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="layers per captured call")
    ap.add_argument("--carveouts", type=int, nargs="+", default=[0, 16, 24, 32, 48, 66])
    ap.add_argument("--programs", type=int, nargs="+", default=[16, 24, 32, 48, 66, 132],
                    help="persistent attention grids to sweep (those equal to a carveout also run "
                         "pipelined beside the GEMMs)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    p = PRESETS[a.model]
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    side = torch.cuda.Stream() if cuda else None
    results = []
    for rows in a.rows:
        layer = Layer(p, rows, a.ctx, a.block_size, a.device, dtype)
        x = torch.randn(rows, p["hidden_size"], device=a.device, dtype=dtype)
        rec = measure(layer, x, a, side)
        best = min(rec["vs_serial"], key=rec["vs_serial"].get)
        C.log(f"{rows} rows: serial {rec['ms_per_layer'][next(iter(rec['ms_per_layer']))]:.3f} "
              f"ms/layer; best {best} x{rec['vs_serial'][best]:.3f}")
        for k, v in rec["vs_serial"].items():
            C.log(f"    {k:44s} {rec['ms_per_layer'][k]:.4f} ms  x{v:.3f}")
        for k, v in rec.get("attention_gbps", {}).items():
            C.log(f"    attention {k:34s} {v:8.1f} GB/s")
        results.append(rec)
    C.write_json(C.out_path(a.out, "overlap_probe.json"),
                 {"env": C.env_info(a.device), "model": a.model, "ctx": a.ctx, "layers": a.layers,
                  "dtype": str(dtype), "results": results})


if __name__ == "__main__":
    main()
