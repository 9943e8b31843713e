"""The one door every Triton launch in replica.kernels goes through, so start-up can compile ahead.

`launch(kernel, grid, *args, **meta)` is `kernel[grid](*args, **meta)`. Inside
`compile_only(executor)`, it instead hands the compile of `kernel` for exactly these arguments
(the same specialization key a real launch computes) to `executor`, through Triton's
`AsyncCompileMode`, and launches nothing: the op's output stays whatever its buffer held.
Leaving the block waits for every compile, files each kernel in Triton's in-memory cache and
builds its C launcher, so the same launches afterwards run at once.

Why: a fresh machine (an empty Triton cache: a new pod, a new node) compiled the engine's ~10
kernels one after another inside start-up's sizing probe, and at each kernel's first launch its C
launcher: 3.6-4.6 s for llama-8b on an H200 (results/startup-cold-compile-ahead-*.json, docs/
perf-notes.md session 14). `compile_ahead(fn)` runs `fn` (the probe) once in this mode on a
thread pool: 1.2-1.3 s. Triton's front end is Python and holds the GIL, its C++ passes, ptxas
and the C compiler do not, so 8 threads gave 1.7x; submitting the slowest kernels first and
building launchers in the compile jobs gave the rest. Only compiles happen on the pool; every
CUDA call stays on the caller's thread.

Contract: the code run under `compile_only` must not read what a Triton op wrote (values are
garbage there), only shapes; the engine's forwards do not (no host syncs, sampling by argmax of
noise). The switch holds for the thread that entered it, as Triton's mode does (a context
variable): another engine starting or stepping on another thread launches as usual.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

MAX_COMPILE_THREADS = 8
_this_thread = threading.local()   # .compile_only: True inside `compile_only` on this thread


def compiling() -> bool:
    """Whether this thread is inside `compile_only` (a launch compiles instead of running)."""
    return getattr(_this_thread, "compile_only", False)


def launch(kernel: Any, grid: tuple, *args: Any, **meta: Any) -> None:
    """Run `kernel` on `grid`, or only compile it inside `compile_only` (on this thread)."""
    if compiling():
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


@contextmanager
def compile_only(executor) -> Iterator[None]:
    """Inside: `launch` compiles on `executor` instead of running; on exit, every compile is done,
    and so is each compiled kernel's C launcher (`_compile_with_launcher`)."""
    import triton
    with triton.AsyncCompileMode(_WithLaunchers(executor)):
        _this_thread.compile_only = True
        try:
            yield
        finally:
            _this_thread.compile_only = False


class _WithLaunchers:
    """The executor AsyncCompileMode submits compiles to: each job also builds its kernel's launcher."""

    def __init__(self, executor):
        self.executor = executor

    def submit(self, compile_fn: Callable[[], Any]):
        return self.executor.submit(_compile_with_launcher, compile_fn)


def _compile_with_launcher(compile_fn: Callable[[], Any]) -> Any:
    """Compile, then build the kernel's C launcher on the same worker. Triton launches a kernel
    through a C module per kernel signature, built with the C compiler at the kernel's first
    launch (then cached on disk beside the kernel): 0.2-0.4 s each, one after another on the
    caller's thread otherwise (results/startup-cold-compile-ahead-*.json). Built here, the first launch
    loads it from the cache. Best effort: on a Triton without these internals, or a failed build,
    the first launch builds it as before."""
    kernel = compile_fn()
    try:
        from triton.runtime.driver import driver
        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:
        pass
    return kernel


def compile_threads() -> int:
    """Threads for start-up compiles: $GRAPHSERVE_COMPILE_THREADS when a positive int (1: one
    compile at a time, as before compile-ahead existed), else one per CPU up to MAX_COMPILE_THREADS."""
    try:
        n = int(os.environ.get("GRAPHSERVE_COMPILE_THREADS", "0"))
    except ValueError:
        n = 0
    return n if n > 0 else max(1, min(MAX_COMPILE_THREADS, os.cpu_count() or 1))


def compile_ahead(fn: Callable[[], Any], threads: int = 0) -> float:
    """Run `fn` once with every Triton launch compiled on a pool of `threads` (0:
    `compile_threads()`) instead of run. Returns the seconds it took."""
    t0 = time.perf_counter()
    workers = threads or compile_threads()
    with ThreadPoolExecutor(workers, thread_name_prefix="graphserve-compile") as pool:
        with compile_only(pool):
            fn()
    return time.perf_counter() - t0
