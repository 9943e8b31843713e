"""`ReplicaWatch`: can the decode deployment serve now, and how long may a request wait for it?

Contract:
- `running()` is the number of decode replicas Serve's controller reports RUNNING, fetched by the
  injected `count_running` (run in a thread; in Serve, `running_replicas()` over `serve.status()`)
  at most once per `period_s` and only when someone asks (a `/health` probe, or a request that
  has waited `period_s`). A failed fetch keeps the last answer (unknown at first: assumed up).
- `ready()` is `running() > 0`: `/health` answers 503 while it is False. A call that got an
  answer from a replica (`bounded` returning) counts as news that one runs.
- `bounded(awaitable)` awaits a handle call. While it is pending and no replica has been running
  for `wait_s` (counted from the later of the call's start and the moment the outage was seen),
  the call is cancelled and `NoReplicaError` (a 503 with Retry-After) is raised. A request that
  waits only because replicas are busy is never cut short; a request on a replica that dies fails
  by itself at once (Ray raises in the caller).
- The controller sees a dead replica at its next health check, so LLMReplica's
  `health_check_period_s` (2 s by default) bounds how late an outage is noticed.

Time and the status source are injected, so tests run it without Ray.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from deployments.errors import DEFAULT_RETRY_AFTER_S, NoReplicaError

log = logging.getLogger("ray.serve")


def running_replicas(app_name: str, deployment: str) -> int:
    """RUNNING replicas of `deployment` in `app_name` as Serve's controller sees them (blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    dep = app.deployments.get(deployment) if app is not None else None
    if dep is None:
        return 0
    return sum(n for state, n in dep.replica_states.items()
               if getattr(state, "value", state) == "RUNNING")


class ReplicaWatch:
    def __init__(self, count_running: Callable[[], int], wait_s: float, *, period_s: float = 0.5,
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        self._count_running = count_running
        self.wait_s = wait_s
        self.period_s = period_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._count: Optional[int] = None
        self._at = float("-inf")
        self._down_since: Optional[float] = None
        self._lock = asyncio.Lock()

    async def running(self) -> int:
        if self._clock() - self._at >= self.period_s:
            async with self._lock:
                if self._clock() - self._at >= self.period_s:
                    await self._refresh()
        return 1 if self._count is None else self._count

    async def _refresh(self) -> None:
        try:
            count = await asyncio.to_thread(self._count_running)
        except Exception as e:  # noqa: BLE001 - the controller is briefly unreachable: keep the last view
            log.warning("graphserve: replica status unavailable (%s: %s)", type(e).__name__, e)
            self._at = self._clock()
            return
        self._at = self._clock()
        if count == 0 and self._down_since is None:
            self._down_since = self._at
            log.warning("graphserve: no decode replica is running")
        elif count > 0:
            if self._down_since is not None:
                log.info("graphserve: %d decode replica(s) running again", count)
            self._down_since = None
        self._count = count

    def _saw_replica(self) -> None:
        if not self._count:
            self._count = 1
        self._down_since = None

    async def ready(self) -> bool:
        return await self.running() > 0

    async def bounded(self, awaitable: Awaitable[Any]) -> Any:
        task = asyncio.ensure_future(awaitable)
        start = self._clock()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.period_s)
                if done:
                    result = task.result()
                    self._saw_replica()
                    return result
                if await self.running() > 0 or self._down_since is None:
                    continue
                if self._clock() - max(start, self._down_since) >= self.wait_s:
                    task.cancel()
                    raise NoReplicaError(
                        f"No model replica is ready to serve this request (waited "
                        f"{self.wait_s:g} s). Retry after {self.retry_after_s:g} s.",
                        self.retry_after_s)
        finally:
            if not task.done():
                task.cancel()
            # A cancelled handle call may end with Serve's RequestCancelledError: retrieve it.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
