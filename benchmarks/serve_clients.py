"""serve_load's clients: run one phase's jobs (benchmarks/serve_traces.py) against the app and record
every sequence as the client saw it.

- interactive: one streaming POST /v1/completions (stream=true, usage in the last event) through
  aiohttp (a Ray Serve dependency, so present wherever Serve is). t_first is the response-header
  time: graphserve starts a stream only once its first token exists.
- batch: the ingress handle's `stream` (list[StreamChunk] per item, token ids included).
- chat: one conversation, its turns one after another through the handle's `stream`; each turn's
  prompt is the previous prompt + the output token ids that came back + the next user message.
A record per sequence (chat: per turn): kind, t_send, t_first, t_last, tokens, done, error, turn.
Records are filled in place while tokens arrive, so a phase stopped at its deadline keeps what its
unfinished sequences had received: `run_phase` cancels them there (an HTTP disconnect or a handle
cancel, which aborts them in the engine) and stamps them `cut` with the stop time.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

from benchmarks.common import percentile
from benchmarks.serve_traces import Job


class LoopLag:
    """How late this process's event loop wakes while a phase runs: a task sleeping `period_s` in
    a loop records each overshoot. Every client of a phase shares this loop, so its lag is part
    of every TTFT the clients measure: the driver's own share of the path."""

    def __init__(self, period_s: float = 0.005):
        self.period_s, self.lags_ms = period_s, []
        self._task: Optional[asyncio.Task] = None

    async def _probe(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lags_ms.append((time.perf_counter() - t - self.period_s) * 1e3)

    async def __aenter__(self) -> "LoopLag":
        self._task = asyncio.ensure_future(self._probe())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def summary(self) -> dict:
        v = self.lags_ms
        return {"driver_loop_lag_ms_p50": percentile(v, 50), "driver_loop_lag_ms_p99": percentile(v, 99),
                "driver_loop_lag_ms_max": max(v, default=None)}


def record(kind: str, t_send: float, **kw) -> dict:
    return {"kind": kind, "t_send": t_send, "t_first": None, "t_last": None, "tokens": 0, "done": False,
            "error": None, **kw}


class Clients:
    """The HTTP session and the ingress handle one phase's jobs go through."""

    def __init__(self, url: str, model: str, stream_handle: Any):
        self.url, self.model, self.stream_handle = url, model, stream_handle
        self._session = None

    async def __aenter__(self) -> "Clients":
        import aiohttp
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    # -- one job ------------------------------------------------------------------------------------
    async def run(self, job: Job, out: list[dict]) -> None:
        if job.kind == "interactive":
            await self.http(job.prompts[0], job.max_tokens, out)
        elif job.kind == "batch":
            await self.batch(job, out)
        else:
            await self.chat(job, out)

    async def http(self, prompt, max_tokens: int, out: list[dict]) -> None:
        rec = record("interactive", time.perf_counter(), prompt_tokens=len(prompt))
        out.append(rec)
        try:
            await self._http(prompt, max_tokens, rec)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed request is data
            rec["error"] = f"{type(e).__name__}: {e}"[:300]

    async def _http(self, prompt, max_tokens: int, rec: dict) -> None:
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with self._session.post(self.url, json=body) as resp:
            rec["t_first"] = time.perf_counter()
            if resp.status != 200:
                rec["t_first"], rec["error"] = None, f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return
            usage = None
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                d = json.loads(line[6:])
                if d.get("choices"):
                    rec["t_last"] = time.perf_counter()
                    rec["tokens"] += 1          # events carry >= 1 token; the usage event corrects it
                usage = d.get("usage") or usage
                if "error" in d:
                    rec["error"] = str(d["error"])[:200]
            if usage:
                rec["tokens"] = usage.get("completion_tokens", rec["tokens"])
            rec["done"] = rec["error"] is None

    async def _stream(self, prompts: list, max_tokens: int, recs: list[dict],
                      outputs: Optional[list[list[int]]] = None) -> None:
        gen = self.stream_handle.remote(prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        finished = False
        try:
            async for chunks in gen:
                now = time.perf_counter()
                for c in chunks:
                    r = recs[c.index]
                    if c.token_ids:
                        r["t_first"] = r["t_first"] or now
                        r["t_last"] = now
                        r["tokens"] += len(c.token_ids)
                        if outputs is not None:
                            outputs[c.index].extend(c.token_ids)
                    if c.finish_reason is not None:
                        r["done"] = True
            finished = True
        finally:
            if not finished:
                gen.cancel()            # stopped at the deadline or failed: abort it in the engine

    async def batch(self, job: Job, out: list[dict]) -> None:
        t = time.perf_counter()
        recs = [record("batch", t, batch=len(job.prompts), prompt_tokens=len(p)) for p in job.prompts]
        out.extend(recs)
        try:
            await self._stream([list(p) for p in job.prompts], job.max_tokens, recs)
        except Exception as e:  # noqa: BLE001 - a failed job is data
            for r in recs:
                r["error"] = r["error"] or f"{type(e).__name__}: {e}"[:300]

    async def chat(self, job: Job, out: list[dict]) -> None:
        history = list(job.prompts[0])
        turns = ((), job.max_tokens), *job.turns
        for i, (user, max_tokens) in enumerate(turns):
            history.extend(user)
            rec = record("chat", time.perf_counter(), turn=i + 1, prompt_tokens=len(history))
            out.append(rec)
            answer: list[list[int]] = [[]]
            try:
                await self._stream([history], max_tokens, [rec], answer)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                return
            history.extend(answer[0])


async def run_phase(clients: Clients, jobs: list[Job], stop_s: float, at_stop=None
                    ) -> tuple[list[dict], float, float, Any]:
    """Launch each job at its arrival time; at `stop_s` after the start, await `at_stop()` (e.g. a
    replica counters snapshot, while everything still runs), then cancel what still runs.
    Returns (records, t0, t_stop, what at_stop returned or None): t_stop is the stop time if
    anything was cut, else the last token's."""
    t0, out, snap = time.perf_counter(), [], None
    if not jobs:
        return out, t0, t0, snap

    async def launch(job: Job) -> None:
        await asyncio.sleep(max(0.0, t0 + job.at - time.perf_counter()))
        try:
            await clients.run(job, out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - HTTP errors and the like
            out.append(record(job.kind, time.perf_counter(), error=f"{type(e).__name__}: {e}"[:300]))

    tasks = [asyncio.ensure_future(launch(j)) for j in jobs]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + stop_s - time.perf_counter()))
    t_stop = time.perf_counter()
    if pending and at_stop is not None:
        snap = await at_stop()
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        for r in out:
            if not r["done"] and r["error"] is None:
                r["cut"] = t_stop
    else:
        t_stop = max([r["t_last"] for r in out if r["t_last"]] or [t_stop])
    return out, t0, t_stop, snap
