"""What fusing a kernel out of the decode step could buy at most: every bucket's greedy decode
graph (the engine's ModelRunner, rows attending --ctx tokens through real block tables, as
`blas_probe.graph_ms`) timed as built, and again with ops LEFT OUT of the capture. The outputs are
wrong with an op left out; only the time counts. A fusion that removes a launch saves at most
what leaving the op out saves, since the fused kernel still does the op's work.

Ops that can be left out: `rope` (rope_store_kv_paged: q is the qkv GEMM's output, unrotated,
and no K/V is stored) and `combine` (the decode combine launch after the split kernel).

    python3 benchmarks/fusion_bound.py --out $OUT/fusion_bound.json    # GPU, ~90 s for 3 presets
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import blas_probe as BP  # noqa: E402
from benchmarks import common as C  # noqa: E402
import replica.kernels as K  # noqa: E402
import replica.kernels.paged_attention as PA  # noqa: E402

VARIANTS = ("as_built", "no_rope", "no_combine", "no_rope_combine")
_rope, _launch = K.rope_store_kv_paged, PA.launch


def _unrotated_q(qkv, cos, sin, positions, slots, k_cache, v_cache, num_heads, num_kv_heads, out=None):
    n, hd = qkv.shape[0], k_cache.shape[-1]
    return qkv[:, : num_heads * hd].view(n, num_heads, hd)


def _launch_without_combine(kernel, grid, *args, **meta):
    if "combine" not in kernel.__name__:
        _launch(kernel, grid, *args, **meta)


def leave_out(variant: str) -> None:
    """Patch the ops `variant` names out of every later capture ("as_built" restores them)."""
    K.rope_store_kv_paged = _unrotated_q if "rope" in variant else _rope
    PA.launch = _launch_without_combine if "combine" in variant else _launch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen2-0.5b,llama-1b,llama-8b")
    ap.add_argument("--ctx", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=40.0)
    a = ap.parse_args()
    rec = dict(env=C.env_info("cuda"), ctx=a.ctx, models={})
    for model in a.models.split(","):
        runs = {v: [] for v in VARIANTS}
        for _ in range(a.repeats):                      # variants alternate within each repeat
            for v in VARIANTS:
                leave_out(v)
                runs[v].append(BP.graph_ms(model, "cublas", a.ctx, a.kv_gib))
        leave_out("as_built")
        best = {v: {b: min(r[b] for r in rs) for b in rs[0]} for v, rs in runs.items()}
        ratio = {v: {b: best[v][b] / best["as_built"][b] for b in best[v]} for v in VARIANTS[1:]}
        rec["models"][model] = dict(runs=runs, best=best, vs_as_built=ratio)
        for b in best["as_built"]:
            C.log(f"{model:<11} bucket {b:<4} as built {best['as_built'][b]:7.3f} ms  " +
                  "  ".join(f"{v} x{ratio[v][b]:.3f}" for v in VARIANTS[1:]))
    C.write_json(a.out, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
