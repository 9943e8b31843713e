"""How fast is our paged prefill attention on long prompts, and which tile shape is fastest?

The roofline counts a prompt's GEMM FLOPs only; a long prompt's causal attention adds 4 * hd * H
FLOPs per (query, key) pair on top (llama-8b at 8k tokens: +15%, at 32k: +62%;
roofline.prompt_attention_flops), so at long prompts the prefill kernel's rate decides how far
below the roofline a trace falls. This probe times `paged_prefill_attention` over its tile knobs
(query tokens per tile, rows per program, keys per tile, warps, stages) on packed steps of long
causal prompts, prompts over long cached prefixes and a mixed step, for several head layouts, and
times torch's own SDPA backends (flash, cuDNN, efficient) on the same causal prompts held
contiguous: what an attention kernel without paging reaches on this card, the ceiling to compare
with. Prints TFLOP/s and each config's time
relative to the engine's default; writes JSON.

    python3 benchmarks/prefill_tiles_probe.py --out $OUT/prefill_tiles.json   # GPU, ~2-3 min
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.kernels_bench import Shapes, prefill_inputs, time_us  # noqa: E402
from replica.presets import PRESETS  # noqa: E402

def preset_shapes(name: str) -> Shapes:
    """A replica/presets.py layout as kernels_bench's Shapes."""
    p = PRESETS[name]
    heads = p["num_attention_heads"]
    return Shapes(name, p["hidden_size"], p["intermediate_size"], heads,
                  p.get("num_key_value_heads") or heads, p.get("head_dim") or p["hidden_size"] // heads)


# G = 4 / 7 / 2 at head_dim 128, G = 4 / 7 at head_dim 64
LAYOUTS = {name: preset_shapes(name) for name in ("llama-8b", "qwen2-7b", "qwen3-0.6b", "llama-1b", "qwen2-0.5b")}
# name -> [(q_len, cached prefix)]; decode rows are (1, context - 1)
CASES = {"1x8192": [(8192, 0)],
         "4x2048": [(2048, 0)] * 4,
         "2048+14k_prefix": [(2048, 14336)],
         "8x256+256dec": [(256, 0)] * 8 + [(1, 1023)] * 256,
         "2x1024": [(1024, 0)] * 2,
         "4x512+200dec": [(512, 0)] * 4 + [(1, 1023)] * 200,
         "8x128+8k_prefix": [(128, 8064)] * 8}
# (tile_tokens, rows, block_n, warps, stages); 0 / None: the engine's choice (the first row timed)
KNOBS = {"all": list(itertools.product((16, 32, 64), (None, 256), (None, 128), (None, 4), (2, 3))),
         "wide": [(32, None, None, None, 3), (64, 256, None, None, 2), (64, 256, None, None, 3),
                  (128, 256, None, None, 3), (32, 256, 128, None, 3)],
         # the engine's choice up to session 15 (32-token tiles of 128 rows, 2 stages), and the
         # tall tiles' spill-free neighbours (8 warps x 32 keys; 16 warps)
         "tall": [(32, 128, None, None, 2), (0, None, 32, None, None), (0, None, None, 16, None),
                  (0, None, None, 16, 2), (0, None, 32, 16, None)]}


def sdpa_ceiling(sh: Shapes, chunks, dtype, device) -> dict:
    """torch SDPA per backend on the causal prompts of `chunks` (prefix-free ones only), batched
    [B, H, T, hd] with K/V expanded to H heads; TFLOP/s of the same causal FLOPs, None if the
    backend refuses the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    lens = {ql for ql, pre in chunks if pre == 0 and ql > 1}
    if len(lens) != 1 or any(pre for _, pre in chunks):
        return {}
    t, b = lens.pop(), len(chunks)
    q = torch.randn(b, sh.heads, t, sh.head_dim, device=device, dtype=dtype)
    k = torch.randn(b, sh.kv_heads, t, sh.head_dim, device=device, dtype=dtype)
    k = k.repeat_interleave(sh.heads // sh.kv_heads, dim=1)
    flops = 4 * sh.head_dim * sh.heads * b * t * (t + 1) // 2
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                us, _ = time_us(lambda i: F.scaled_dot_product_attention(q, k, k, is_causal=True), device)
            out[name] = flops / us / 1e6
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result
            out[name] = None
            C.log(f"  sdpa {name}: {type(e).__name__}: {str(e)[:100]}")
    return out


def sweep_case(sh: Shapes, name: str, chunks, dtype, device, paged_prefill, meta_cls, knob_set) -> dict:
    inp, _, flops = prefill_inputs(sh, chunks, dtype, device, meta_cls)
    q_lens, kv_lens = [ql for ql, _ in chunks], [ql + pre for ql, pre in chunks]
    scale = 1.0 / math.sqrt(sh.head_dim)
    rows, default_us = [], None
    engine_tiles = paged_prefill.prefill_tile_tokens(dtype, sh.head_dim, sh.heads // sh.kv_heads)
    for tile_tokens, nrows, block_n, warps, stages in [(0, None, None, None, None)] + knob_set:
        tile_tokens = tile_tokens or engine_tiles     # 0: the engine's
        meta = meta_cls.build(q_lens, kv_lens, list(range(len(chunks))), device, tile_tokens=tile_tokens)
        knobs = {k: v for k, v in dict(rows=nrows, block_n=block_n, num_warps=warps).items() if v}
        fn = lambda i, m=meta, kn=knobs, st=stages: paged_prefill.paged_prefill_attention(  # noqa: E731
            inp["q"], inp["k"], inp["v"], inp["tables"], m, scale, num_stages=st, **kn)
        try:
            us, _ = time_us(fn, device)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: recorded, not fatal
            rows.append(dict(tile_tokens=tile_tokens, stages=stages, **knobs, error=f"{type(e).__name__}"))
            continue
        default_us = default_us or us
        rows.append(dict(tile_tokens=tile_tokens, stages=stages, **knobs, us=us,
                         tflops=flops / us / 1e6, vs_default=us / default_us))
    ok = sorted((r for r in rows[1:] if "us" in r), key=lambda r: r["us"])
    best = ok[0] if ok else None
    rec = dict(layout=sh.name, case=name, flops=flops, default=rows[0], best=best, top=ok[:5],
               rows=rows, sdpa_tflops=sdpa_ceiling(sh, chunks, dtype, device))
    C.log(f"{sh.name:<10} {name:<16} default {rows[0]['tflops']:6.1f} TFLOP/s; best "
          f"{best['tflops'] if best else float('nan'):6.1f} ({ {k: v for k, v in (best or {}).items() if k not in ('us', 'tflops', 'vs_default')} })"
          f" x{best['vs_default'] if best else float('nan'):.2f}; sdpa {rec['sdpa_tflops']}")
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--knobs", default="all", choices=sorted(KNOBS))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_tiles_probe needs a GPU")
    from replica.kernels import PrefillMeta, paged_prefill
    device, dtype = torch.device("cuda"), torch.bfloat16
    rec = dict(env=C.env_info("cuda"), knobs=KNOBS[a.knobs], cases=[],
               knob_fields="(tile_tokens, rows, block_n, warps, stages); 0 / None: the engine's choice")
    for layout in a.layouts.split(","):
        for name in a.cases.split(","):
            rec["cases"].append(sweep_case(LAYOUTS[layout], name, CASES[name], dtype, device,
                                           paged_prefill, PrefillMeta, KNOBS[a.knobs]))
            torch.cuda.empty_cache()
            C.write_json(a.out, rec)  # after every case: a cut-short run keeps what it measured
    C.log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
