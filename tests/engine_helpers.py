"""Helpers for driving the async engine from synchronous tests."""
from __future__ import annotations

import asyncio

from replica import GenerationRequest, SamplingParams


async def collect(engine, ids=None, prompt=None, **params):
    """Run one request to the end; returns (token ids, text, finish_reason)."""
    req = GenerationRequest(prompt=prompt, prompt_token_ids=ids, params=SamplingParams(**params))
    toks, text, reason = [], "", None
    async for chunk in engine.generate(req):
        toks += chunk.token_ids
        text += chunk.text
        reason = chunk.finish_reason
    return toks, text, reason


def run(coro):
    return asyncio.run(coro)


def detokenize(tokenizer, chunks, stop=(), context=()):
    """Feed `chunks` (lists of ids) through an IncrementalDetokenizer as the engine does; returns
    (text emitted, stop string matched or None). The text is flushed only when none matched."""
    from replica.detokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer(tokenizer, stop, context=context)
    out = []
    for ids in chunks:
        d.add(ids)
        piece, matched = d.take(final=False)
        out.append(piece)
        if matched:
            return "".join(out), matched
    out.append(d.flush_all())
    return "".join(out), None


def prefill_then_decode_batch(core, prompts, params):
    """Drive an EngineCore (no worker thread) until every prompt has its first token, drain the step
    in flight, and return the pure-decode StepBatch of the next step (not launched)."""
    from replica.sequence import Sequence

    seqs = [Sequence(f"h{i}", list(p), params, 1000 + i) for i, p in enumerate(prompts)]
    for s in seqs:
        core.scheduler.submit(s)
    while not all(s.output_ids for s in seqs):
        core.step()
    if core._inflight is not None:                      # drain the lookahead step
        batch, inflight = core._inflight
        core.scheduler.postprocess(batch, *core.runner.collect(inflight))
        core._inflight = None
    batch = core.scheduler.schedule([])
    assert not batch.mixed and len(batch.decode) == len(prompts), \
        f"expected a pure decode step of {len(prompts)} rows, got {len(batch.decode)} rows + {len(batch.chunks)} chunks"
    return batch


def replay_vs_eager(core, prompts, params):
    """Run one decode step of `prompts` as the engine would (graph replay on CUDA), then the same
    static inputs eagerly. Returns (InFlight, (tokens, logits) replayed, (tokens, logits) eager)."""
    import torch

    assert params.ignore_eos, "a sequence that stops on EOS leaves the decode batch: use ignore_eos"
    r = core.runner
    try:
        batch = prefill_then_decode_batch(core, prompts, params)
        b = len(batch.decode)
        with torch.inference_mode():
            counts = r.tables.counts.clone()      # the step adds its tokens to the penalty counts
            step = r.launch(batch)
            r.collect(step)
            width = step.bucket
            replay = (r.out.tokens[:b].clone(), r.decode.logits[:b].float().clone())
            mode = "greedy" if params.plain_greedy else "full"
            r.tables.counts.copy_(counts)
            r.decode.run(width, mode)   # same static inputs, no graph; rewrites the same KV entries
            if r.device.type == "cuda":
                torch.cuda.synchronize()
            eager = (r.out.tokens[:b].clone(), r.decode.logits[:b].float().clone())
    finally:
        core.abort_all()
    return step, replay, eager


def assert_greedy_matches_hf(engine, hf, prompts, max_tokens):
    """Send every prompt at once (greedy, ignore_eos) and assert each one's tokens equal HF
    `generate` on the HF model's device. The explicit attention mask matters: with pad_token_id 0,
    HF would otherwise mask the prompt's own zeros."""
    import torch

    async def together():
        return await asyncio.gather(*[collect(engine, ids=p, max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True) for p in prompts])
    for p, (toks, _, _) in zip(prompts, run(together())):
        ids = torch.tensor([p], device=hf.device)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert toks == ref, (p, toks, ref)


def assert_steps_replayed_graphs(engine):
    """Every pure-decode step so far replayed a graph, and some mixed steps replayed the piecewise
    mixed-step graphs."""
    s = engine.stats()
    assert s.decode_steps and all(path == "graph" for _, path in s.decode_steps), s.decode_steps
    assert s.mixed_graph_steps > 0, (s.mixed_graph_steps, s.mixed_steps)
