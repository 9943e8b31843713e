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
