"""What the full sampler costs per decode step, part by part, against the greedy argmax (GPU).

A batch whose rows are not all plain greedy (temperature > 0, the OpenAI default; logprobs, bias,
penalties) replays the "full" decode graph, which runs `SamplingTables.full` over [B, V] fp32
logits. This times, graph-replayed (kernels_bench.time_us), at each batch and vocabulary:
- `greedy`: the argmax the greedy graph runs;
- `full`: the sampler the engine runs (the Triton kernels of replica/kernels/sample.py on CUDA);
- `full_torch`: the torch sampler they replaced, and its parts: `processed` (bias, bans,
  penalties), `draw` (temperature, top-k/top-p/min-p, the race), `logprobs` (log_softmax, gather,
  top 20), and inside the draw the `sort` and the hashed `noise` alone;
with the parameters the rows carry set by --params (values do not change the work of the torch
sampler: it sorts and hashes every row whatever they are; the kernels' rejection rounds and
logprobs do depend on them). Ratios are over `greedy`; the decode step itself is timed by
graph_profile.py --modes greedy,full.

    python3 benchmarks/sampling_probe.py --out $OUT/sampling_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.kernels_bench import time_us  # noqa: E402

from replica.graphs import StepOutputs  # noqa: E402
from replica.sampling import SamplingTables, draw, greedy, uniform_noise  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402


def parts(tables: SamplingTables, logits: torch.Tensor, out) -> dict:
    """name -> fn(i) over one batch; every fn reads the same logits and table rows."""
    B = logits.shape[0]
    dev = logits.device
    rows, steps = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
    f, ints = tables.floats[rows], tables.ints[rows]
    x = tables.processed(logits.float(), rows, steps)
    ids = torch.arange(logits.shape[1], device=dev).expand(B, -1)
    return {
        "greedy": lambda i: out.tokens[:B].copy_(greedy(logits)),
        "full": lambda i: tables.full(logits, rows, steps, out.view(B)),
        "full_torch": lambda i: tables.full_torch(logits, rows, steps, out.view(B)),
        "processed": lambda i: tables.processed(logits.float(), rows, steps),
        "draw": lambda i: draw(x, f[:, 0], ints[:, 0], f[:, 1], f[:, 2], ints[:, 1], steps),
        "sort": lambda i: torch.sort(x, dim=-1, descending=True),
        "noise": lambda i: uniform_noise(ints[:, 1], steps, ids),
        "logprobs": lambda i: torch.log_softmax(logits.float(), dim=-1).topk(20, dim=-1),
    }


def probe(B: int, V: int, params: SamplingParams, device, names=None) -> dict:
    tables = SamplingTables(B, V, device)
    tables.write(list(range(B)), [params] * B, list(range(B)), [[1, 2, 3]] * B, [[]] * B, [()] * B)
    out = StepOutputs(B, device)
    logits = torch.randn(B, V, device=device, dtype=torch.bfloat16) * 3
    times = {name: time_us(fn, device)[0] for name, fn in parts(tables, logits, out).items()
             if names is None or name in names}
    return {"batch": B, "vocab": V, "us": times,
            "over_greedy": {k: v / times["greedy"] for k, v in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--batches", default="1,64,256,512")
    ap.add_argument("--vocabs", default="128256,151936")
    ap.add_argument("--parts", default=None, help="comma list of what to time (default all; greedy always)")
    ap.add_argument("--params", default='[{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}, '
                    '{"temperature": 1.0, "top_k": 50, "logprobs": 5}]',
                    help="a JSON list of SamplingParams fields: one probe each, every row alike")
    a = ap.parse_args()
    device = torch.device("cuda")
    rec = {"env": C.env_info("cuda"), "cases": []}
    for fields in json.loads(a.params):
        for V in map(int, a.vocabs.split(",")):
            for B in map(int, a.batches.split(",")):
                names = None if a.parts is None else {"greedy", *a.parts.split(",")}
                r = {"params": fields, **probe(B, V, SamplingParams(**fields), device, names)}
                rec["cases"].append(r)
                C.log(f"{fields} B={B} V={V}: " + ", ".join(f"{k} {v:.0f} us" for k, v in r["us"].items()))
                torch.cuda.empty_cache()
    C.write_json(C.out_path(a.out, "sampling_probe.json"), rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
