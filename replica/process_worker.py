"""`ProcessWorker`: the engine core in a child process of its own (servers on CUDA).

The step thread calls hundreds of torch ops per step, each releasing and re-taking the GIL; next to
a Serve replica's busy asyncio loop every re-take can wait a GIL switch interval (measured: 20 torch
ops 0.07 ms alone, 72 ms next to one busy thread). In its own process the loop never waits for the
caller's GIL, and the caller never imports torch (the child does; replica/engine.py decides which
worker runs without torch too). Same contract as `ThreadWorker` (replica/worker.py).

Process protocol (pickled tuples over a socketpair, `multiprocessing.connection.Connection`):
parent -> child: ("config", EngineConfig), then ("submit", Sequence), ("abort", id), ("stop",)
child -> parent: ("ready", EngineInfo, EngineStats) | ("failed", exception),
                 then ("events", packed events, EngineStats) per step, ("stopped", ..., EngineStats).
Events travel as the scheduler builds them (`StepEvents`, sent as its three fields): the common
one-token event as two columns (request ids, tokens), the rest as `Event`s. 500 NamedTuples
pickle in 0.41 ms, the columns in 0.02 ms (dev CPU), and that pickling runs under the engine
loop's GIL.
The child starts importing torch before the config arrives; the constructor returns once the
process is spawned and `wait_ready()` blocks until the core is built, so the caller can load its
tokenizer meanwhile.
"""
from __future__ import annotations

import time as _time
_MODULE_T0 = _time.time()      # the engine process's imports are timed from here (StartupReport)

import dataclasses  # noqa: E402 - the imports below are what _MODULE_T0 times
import gc
import importlib.util
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Optional

from replica.config import EngineConfig
from replica.scheduler import EngineOverloadedError
from replica.sequence import Event, Sequence, StepEvents
from replica.stats import EngineStats
from replica.worker import (OVERLOADED, STALL_SECONDS, EngineCore, EngineDeadError, OnEvents,
                            OnFailure)

log = logging.getLogger("replica")
PYCACHE_ENV = "GRAPHSERVE_PYCACHE"     # where the engine process caches bytecode, or "off"


class ProcessWorker:
    def __init__(self, config: EngineConfig, on_events: OnEvents, on_failure: OnFailure):
        self._on_events, self._on_failure = on_events, on_failure
        parent, child = socket.socketpair()
        env = bytecode_env({**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        self._proc = subprocess.Popen([sys.executable, "-m", "replica.process_worker", str(child.fileno()),
                                       repr(time.time())], pass_fds=(child.fileno(),), env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self.error: Optional[BaseException] = None
        self._stopping = False
        self._reader: Optional[threading.Thread] = None     # started by wait_ready
        self._send(("config", config))

    def wait_ready(self) -> None:
        """Block until the engine process has built its core (imports, weights, capture); the
        caller may do its own start-up work between the constructor and this call."""
        try:
            kind, *payload = self._conn.recv()
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

    def submit(self, seq: Sequence) -> None:
        s = self._stats
        if s.max_queued is not None and s.queued >= s.max_queued:   # the child enforces it exactly
            raise EngineOverloadedError(f"the engine's queue is full ({s.max_queued} requests wait)")
        self._send(("submit", seq))

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
        if self._reader is None:        # never became ready (or the caller gave up): no goodbye
            self._proc.kill()
            self._proc.wait(timeout=30)
            self._conn.close()
            return
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
                kind, packed, stats = self._conn.recv()
                events = StepEvents(*packed)
                if stats.prefix_hashes is None:   # sent only when refreshed: keep the last one
                    stats = dataclasses.replace(stats, prefix_hashes=self._stats.prefix_hashes,
                                                prefix_summary_time=self._stats.prefix_summary_time)
                self._stats, self._last_message = stats, time.monotonic()
                if events:
                    self._on_events(events)
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


def bytecode_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for the engine process, set up so its imports reuse compiled bytecode. Images often set
    PYTHONDONTWRITEBYTECODE and ship torch without .pyc files; then every engine start compiles
    torch's and Triton's sources again (`import torch, triton` 4.9-5.1 s on the H200 host, 2.1-2.3 s
    from cached bytecode: benchmarks/results/bytecode-imports-h200-*.json). Bytecode then goes to a
    cache directory (PYTHONPYCACHEPREFIX: nothing is written beside the sources), as Triton caches
    its kernels.
    `GRAPHSERVE_PYCACHE`: that directory (default ~/.cache/graphserve/pycache), or "off". Left
    alone when the caller chose a prefix, or when torch has its bytecode beside its sources."""
    choice = env.get(PYCACHE_ENV, "")
    if choice == "off" or env.get("PYTHONPYCACHEPREFIX"):
        return env
    spec = importlib.util.find_spec("torch")       # finds, does not import
    if spec is None or spec.origin is None or os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return env
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = choice or os.path.join(os.path.expanduser("~"), ".cache", "graphserve", "pycache")
    return env


def _child_main(fd: int, spawned_at: float, imports_s: float = 0.0) -> None:
    """The engine process: build the EngineCore, then step whenever there is work. Messages to the
    parent go out through a sender thread, so a parent slow to read (its socket buffer full) never
    holds the GPU loop back; the loop only pickles and queues."""
    conn = Connection(fd)
    _, config = conn.recv()
    t0 = time.perf_counter()
    process_s = time.time() - spawned_at
    try:
        core = EngineCore(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", e))
        return
    core.mark_ready(process_s=process_s, ready_s=process_s + time.perf_counter() - t0, imports_s=imports_s)
    conn.send(("ready", core.info, core.stats()))
    gc.collect()
    gc.freeze()                    # weights, tables, startup objects: never scanned again
    gc.set_threshold(20_000, 20, 50)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_loop, args=(conn, outbox), name="graphserve-sender", daemon=True)
    sender.start()
    while sender.is_alive():
        # Drain every command that is waiting; block only when there is nothing to step.
        while conn.poll(0 if core.has_work() else 1.0):
            msg = conn.recv()
            if msg[0] == "submit":
                try:
                    core.scheduler.submit(msg[1])
                except EngineOverloadedError:
                    refused = StepEvents(other=[Event(msg[1].request_id, (), OVERLOADED)])
                    outbox.put(("events", refused, core.stats(False)))
            elif msg[0] == "abort":
                core.scheduler.abort(msg[1])
            else:  # "stop"
                outbox.put(("stopped", core.abort_all(), core.stats()))
                outbox.put(None)
                sender.join(timeout=30)
                return
        if core.has_work():
            events, stats = core.step_and_stats(core.summary_due())
            outbox.put(("events", events, stats))


def _send_loop(conn: Connection, outbox: "queue.SimpleQueue") -> None:
    try:
        while (msg := outbox.get()) is not None:
            if msg[0] in ("events", "stopped"):
                events: StepEvents = msg[1]
                msg = (msg[0], (events.ids, events.tokens, events.other), msg[2])
            conn.send(msg)
    except OSError:
        pass               # the parent is gone: the main loop sees this thread end and exits


if __name__ == "__main__":
    import replica.model_runner  # noqa: F401 - torch and the kernels, before the config arrives
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Run the importable module's copy, so pickles name `replica.*` classes, not `__main__.`
    from replica.process_worker import _child_main as child_main
    child_main(int(sys.argv[1]), float(sys.argv[2]), imports_s=time.time() - _MODULE_T0)
