"""The engine's host time per step at many decode rows, with the model stubbed out (CPU, seconds).

On a GPU the step loop must hide its Python (schedule step k+1, launch it, read step k's tokens,
postprocess them, pickle the events) behind the GPU step in flight; for a small model at 512 rows
that GPU step is ~3 ms, so this number decides whether the engine is host-bound. The model's
`decode` and `forward_mixed` are replaced by stubs that return fixed logits, so what is timed is the
scheduler, the runner's host work and the event traffic, on whatever CPU runs it.

    python benchmarks/host_step.py                   # 500 requests, prompt U[200,400], 100 decode steps
    python benchmarks/host_step.py --rows 256 --steps 200
    python benchmarks/host_step.py --finishing 0.5  # half the rows end inside the timed steps

Prints, once every request decodes, ms per step of `EngineCore.step()`, how many of those steps
the scheduler planned row by row rather than built from the last one (`Scheduler._plan`: after an
admission or a preemption) and the time `schedule` took; the host time of the mixed steps that
admitted them (prompt chunks up to `--budget` tokens beside the decode rows); and the cost of
packing and pickling one step's events and stats as the process worker sends them (its sender
thread does that under the same GIL).
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from replica import EngineConfig, SamplingParams  # noqa: E402
from replica.sequence import Sequence  # noqa: E402
from replica.worker import EngineCore  # noqa: E402


def stub_model(core: EngineCore) -> None:
    """Replace the forwards by constant logits (token 65 decoded, 66 after a prefill chunk)."""
    model = core.runner.model
    vocab = model.shape.vocab_size

    def decode(*args, **kw):
        logits = args[-1]
        logits.zero_()
        logits[:, 65] = 1.0

    def forward_mixed(tokens, positions, slots, meta, kv, logit_rows):
        out = torch.zeros(logit_rows.shape[0], vocab)
        out[:, 66] = 1.0
        return out
    model.decode, model.forward_mixed = decode, forward_mixed


def count_calls(obj, name: str) -> list[float]:
    """Wrap obj.name to count its calls and the seconds they take; returns [calls, seconds]."""
    tally, inner = [0, 0.0], getattr(obj, name)

    def counted(*args, **kw):
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        tally[0] += 1
        tally[1] += time.perf_counter() - t0
        return out
    setattr(obj, name, counted)
    return tally


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500, help="requests, all decoding at once")
    ap.add_argument("--steps", type=int, default=100, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2048, help="step_token_budget (the engine's default)")
    ap.add_argument("--finishing", type=float, default=0.0,
                    help="share of the rows whose max_tokens ends inside the timed steps, spread evenly")
    a = ap.parse_args(argv)
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < a.rows) + (a.rows,)
    for r in range(a.repeats):
        core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=1024,
                                       max_num_seqs=a.rows, batch_buckets=buckets, step_token_budget=a.budget))
        stub_model(core)
        rng = random.Random(r)
        for i in range(a.rows):
            prompt = [rng.randrange(256) for _ in range(rng.randint(200, 400))]
            ends = i < a.finishing * a.rows          # ends after 3..steps tokens: inside the window
            max_tokens = 3 + int((a.steps - 3) * i / max(1, a.finishing * a.rows)) if ends else a.steps + 200
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            core.scheduler.submit(Sequence(f"r{i}", prompt, params, i))
        t0 = time.perf_counter()
        while core.scheduler.waiting or core.scheduler._incoming or core.tokens["mixed_steps"] == 0 \
                or any(s.num_computed < len(s.prompt_ids) for s in core.scheduler.running.values()):
            core.step()                                   # admit and prefill everything: mixed steps
        mixed_s = (time.perf_counter() - t0) / max(1, core.tokens["mixed_steps"])
        core.step()
        planned = count_calls(core.scheduler, "_plan")
        scheduled = count_calls(core.scheduler, "schedule")
        t0 = time.perf_counter()
        for _ in range(a.steps):
            events = core.step()
            stats = core.stats(core.summary_due())
        per_step = (time.perf_counter() - t0) / a.steps
        t0 = time.perf_counter()
        for _ in range(20):
            blob = pickle.dumps(("events", (events.ids, events.tokens, events.other), stats),
                                protocol=pickle.HIGHEST_PROTOCOL)
        pickle_s = (time.perf_counter() - t0) / 20
        print(f"repeat {r}: {len(events)} rows at the end, host {per_step * 1e3:.2f} ms/step "
              f"({planned[0]} of {a.steps} planned row by row, schedule {scheduled[1] / a.steps * 1e3:.3f} ms), "
              f"events pickle {pickle_s * 1e3:.2f} ms ({len(blob)} bytes); admission: "
              f"{core.tokens['mixed_steps']} mixed steps of {a.budget} tokens, {mixed_s * 1e3:.2f} ms each")


if __name__ == "__main__":
    main()
