"""Where the step loop runs: a thread of this process, or a child process of its own.

Both backends take `SeqSpec`s and aborts, run `StepLoop.step()` whenever there is work, and hand
each step's `EventRecord`s to `on_events` (called from a background thread of this process).

Why a process: the step thread calls hundreds of torch ops per step and each one releases and
re-takes the GIL. In a Ray Serve replica, whose asyncio loop and Ray threads are busy streaming
tokens, every re-take can wait a whole GIL switch interval (5 ms): measured here, 20 small torch
ops went from 0.07 ms to 72 ms next to one busy Python thread. In its own process the loop never
waits for the GIL. CPU tests and the in-process benchmark use the thread (no start-up cost).

Process protocol (pickled tuples over a socketpair, `multiprocessing.connection.Connection`):
parent -> child: ("config", EngineConfig) once, then ("submit", SeqSpec), ("abort", id), ("stop",)
child -> parent: ("ready", EngineInfo, EngineStats) | ("failed", exception),
                 then ("events", [EventRecord], EngineStats) per step, ("stopped", [EventRecord], EngineStats).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Callable, Optional

from replica.config import EngineConfig
from replica.step_loop import EventRecord, SeqSpec, StepLoop
from replica.stats import EngineStats

log = logging.getLogger("replica")
STALL_SECONDS = 60.0
OnEvents = Callable[[list[EventRecord]], None]


class EngineDeadError(RuntimeError):
    """The engine was shut down or its step loop failed; the request cannot run."""


class ThreadBackend:
    def __init__(self, config: EngineConfig, on_events: OnEvents, on_failure: Callable[[BaseException], None]):
        self.loop = StepLoop(config)
        self.info = self.loop.info
        self._on_events, self._on_failure = on_events, on_failure
        self._wake = threading.Condition()
        self._stopping = False
        self.error: Optional[BaseException] = None
        self._in_step_since: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="graphserve-step", daemon=True)
        self._thread.start()

    def submit(self, spec: SeqSpec) -> None:
        self.loop.submit(spec)
        self._notify()

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)
        self._notify()

    def stats(self) -> EngineStats:
        return self.loop.stats()

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"step loop failed: {self.error!r}") from self.error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("step loop is not running")
        since = self._in_step_since
        if since is not None and time.monotonic() - since > STALL_SECONDS:
            raise EngineDeadError(f"one engine step has run for over {STALL_SECONDS:.0f} s")

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.loop.has_work():
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        break
                self._in_step_since = time.monotonic()
                events = self.loop.step()
                self._in_step_since = None
                self._on_events(events)
            self._on_events(self.loop.abort_all())
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to its waiters
            log.exception("engine step loop failed")
            self.error = e
            self._on_failure(e)


class ProcessBackend:
    def __init__(self, config: EngineConfig, on_events: OnEvents, on_failure: Callable[[BaseException], None]):
        self._on_events, self._on_failure = on_events, on_failure
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "replica.backends", str(child.fileno())],
                                      pass_fds=(child.fileno(),), env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self.error: Optional[BaseException] = None
        self._stopping = False
        self._send(("config", config))
        try:
            kind, *payload = self._conn.recv()  # blocks through weight load and graph capture
        except EOFError:
            raise EngineDeadError(f"the engine process exited during startup (code {self._proc.wait()}); "
                                  "its log is above") from None
        if kind == "failed":
            self._proc.wait(timeout=30)
            raise payload[0]
        self.info, self._stats = payload
        self._last_message = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="graphserve-engine-reader", daemon=True)
        self._reader.start()

    def submit(self, spec: SeqSpec) -> None:
        self._send(("submit", spec))

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except EngineDeadError:
            pass  # nothing runs any more, so nothing is left to abort

    def stats(self) -> EngineStats:
        return self._stats

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine process failed: {self.error!r}") from self.error
        if self._stopping or self._proc.poll() is not None or not self._reader.is_alive():
            raise EngineDeadError("engine process is not running")
        busy = self._stats.running or self._stats.queued
        if busy and time.monotonic() - self._last_message > STALL_SECONDS:
            raise EngineDeadError(f"the engine process has sent nothing for over {STALL_SECONDS:.0f} s")

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            self._send(("stop",))
        except EngineDeadError:
            pass
        self._reader.join(timeout=30)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:  # the child is gone (killed, crashed): say so in the engine's terms
            raise EngineDeadError(f"the engine process is gone (code {self._proc.poll()})") from e

    def _read(self) -> None:
        try:
            while True:
                kind, records, stats = self._conn.recv()
                self._stats, self._last_message = stats, time.monotonic()
                self._on_events(records)
                if kind == "stopped":
                    return
        except (EOFError, OSError):
            if not self._stopping:
                try:
                    code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                self.error = EngineDeadError(f"the engine process exited (code {code})")
                log.error("%s", self.error)
                self._on_failure(self.error)
        except BaseException as e:  # noqa: BLE001
            self.error = e
            self._on_failure(e)


def _child_main(fd: int) -> None:
    """The engine process: build the StepLoop, then step whenever there is work."""
    conn = Connection(fd)
    _, config = conn.recv()
    try:
        loop = StepLoop(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", e))
        return
    conn.send(("ready", loop.info, loop.stats()))
    while True:
        # Drain every command that is waiting; block only when there is nothing to step.
        while conn.poll(0 if loop.has_work() else 1.0):
            msg = conn.recv()
            if msg[0] == "submit":
                loop.submit(msg[1])
            elif msg[0] == "abort":
                loop.abort(msg[1])
            else:  # "stop"
                conn.send(("stopped", loop.abort_all(), loop.stats()))
                return
        if loop.has_work():
            events = loop.step()
            conn.send(("events", events, loop.stats()))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _child_main(int(sys.argv[1]))
