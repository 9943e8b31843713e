"""Where does a busy replica's step time go? Prefill chunks vs decode, measured in one process.

Times, on one GPU with random llama-8b weights: an eager prefill chunk (512 tokens at start 0 and
at start 512; and 3 sequences sharing one 512-token budget), the attention call inside it (SDPA with
an explicit mask, GQA), a first-token sample, and the replayed decode step at 64 rows. Then a
whole-engine run shaped like serve_load's burst on the throughput replica (B prompts of ~320 tokens,
96 new tokens each, 64 slots) and its steps per second, as ratios to the decode step.

  python benchmarks/prefill_probe.py --out $OUT/prefill_probe.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replica import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from replica.sampling import sample  # noqa: E402


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def component_times(eng) -> dict:
    rt = eng.runtime
    m, kv = rt.model, rt.kv
    V = m.shape.vocab_size
    out = {}
    with torch.inference_mode():
        toks = torch.randint(0, V, (512,), device=rt.device)
        out["prefill_512_at_0_ms"] = timed(lambda: m.prefill([(toks, 0, 0)], kv))
        out["prefill_512_at_512_ms"] = timed(lambda: m.prefill([(toks, 512, 0)], kv))
        parts = [torch.randint(0, V, (n,), device=rt.device) for n in (100, 320, 92)]
        out["prefill_3_seqs_512_tokens_one_call_each_ms"] = timed(lambda: [m.prefill([(p, 0, i)], kv) for i, p in enumerate(parts)])
        out["prefill_3_seqs_512_tokens_packed_ms"] = timed(lambda: m.prefill([(p, 0, i) for i, p in enumerate(parts)], kv))
        q = torch.randn(1, 32, 512, 128, device=rt.device, dtype=rt.dtype)
        k = torch.randn(1, 8, 1024, 128, device=rt.device, dtype=rt.dtype)
        mask = torch.ones(512, 1024, dtype=torch.bool, device=rt.device).tril(512)
        out["sdpa_mask_gqa_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True))
        k4 = k.repeat_interleave(4, dim=1)
        out["sdpa_mask_expanded_kv_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k4, k4, attn_mask=mask))
        qc, kc = q, k4[:, :, :512]
        out["sdpa_causal_flash_ms"] = timed(lambda: F.scaled_dot_product_attention(qc, kc, kc, is_causal=True))
        logits = torch.randn(1, V, device=rt.device, dtype=rt.dtype)
        one = lambda x: torch.tensor([x], device=rt.device)
        out["first_token_sample_ms"] = timed(lambda: sample(logits, one(0.0), one(0), one(1.0), one(1), one(0)).item())
        rows = [(1, 600, s, 0, 1, 1, 0.0, 1.0, -1) for s in range(64)]
        g = rt.graphs
        out["decode_b64_graph_ms"] = timed(lambda: g.collect(g.launch(rows, False)), reps=20)
    return out


def engine_burst(eng, batch: int, prompt: int, new: int) -> dict:
    async def one(i):
        ids = torch.randint(0, 2000, (prompt,)).tolist()
        req = GenerationRequest(prompt_token_ids=ids, params=SamplingParams(max_tokens=new, temperature=0.0,
                                                                            ignore_eos=True))
        async for _ in eng.generate(req):
            pass

    async def run():
        await asyncio.gather(*[one(i) for i in range(batch)])
    before = eng.stats()
    t = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t
    after = eng.stats()
    steps = sum(after.decode_steps.values()) - sum(before.decode_steps.values())
    return {"sequences": batch, "prompt": prompt, "new": new, "wall_s": round(wall, 3), "decode_steps": steps,
            "ms_per_step": round(wall / max(steps, 1) * 1e3, 3),
            "prompt_tokens": after.prompt_tokens - before.prompt_tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = EngineConfig(model="random:llama-8b", dtype="bfloat16", max_seq_len=1024, max_num_seqs=64,
                       batch_buckets=(16, 32, 64), engine_process="thread")
    eng = Engine(cfg)
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res["components"] = {k: round(v, 3) for k, v in component_times(eng).items()}
    print(json.dumps(res["components"], indent=1), flush=True)
    res["burst"] = engine_burst(eng, 192, 320, 96)
    print(json.dumps(res["burst"]), flush=True)
    eng.shutdown()
    for mode in ("process",):
        eng = Engine(cfg.replace(engine_process=mode))
        res[f"burst_{mode}"] = engine_burst(eng, 192, 320, 96)
        print(mode, json.dumps(res[f"burst_{mode}"]), flush=True)
        eng.shutdown()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
