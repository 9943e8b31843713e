"""Helpers for the integration tests: the shared cluster's coordinates and a polling wait."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class RayCluster:
    gcs_address: str      # for second drivers and `serve run --address`
    http_port: int        # Serve's HTTP proxy
    metrics_port: int     # Ray's Prometheus exporter (/metrics)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, period_s: float = 0.5) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_error = e
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def wait_for_routing_stats(reports: Callable[[], list[dict]], replicas: int, timeout_s: float = 60) -> None:
    """Until each of `replicas` LLMReplica `counters()` reports shows two routing-stats polls.

    Serve's controller polls `record_routing_stats` and broadcasts the result to every router, so
    after a replica's second poll the routers hold at least its first snapshot. Until then our
    router ranks that replica last (no stats), whatever its load: a burst sent earlier can all
    land on the replica that published first."""
    def ready() -> bool:
        rs = list(reports())
        return len(rs) == replicas and all(r["routing_stats_polls"] >= 2 for r in rs)
    wait_for(ready, timeout_s, f"{replicas} replicas' routing stats to reach the routers")
