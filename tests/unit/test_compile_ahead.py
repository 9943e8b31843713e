"""replica/kernels/launch.py: the launch door and the compile-ahead switch, with a fake kernel.
(The real Triton path, compiles on a pool and none left for the probe: tests/gpu/test_startup.py.)"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from replica.kernels import launch as L  # noqa: E402


class FakeKernel:
    """Records `kernel[grid](...)` launches and `kernel.warmup(...)` compiles."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append(("run", grid, args, meta))

    def warmup(self, *args, grid, **meta):
        self.calls.append(("compile", grid, args, meta))


def test_launch_runs_outside_and_only_compiles_inside():
    k = FakeKernel()
    L.launch(k, (4, 2), "x", 7, BLOCK=64, num_warps=4)
    seconds = L.compile_ahead(lambda: L.launch(k, (4, 2), "x", 7, BLOCK=64, num_warps=4), threads=2)
    L.launch(k, (1,), "y")
    assert k.calls == [("run", (4, 2), ("x", 7), {"BLOCK": 64, "num_warps": 4}),
                       ("compile", (4, 2), ("x", 7), {"BLOCK": 64, "num_warps": 4}),
                       ("run", (1,), ("y",), {})]
    assert seconds >= 0


def test_the_switch_is_off_after_an_error():
    k = FakeKernel()

    def boom():
        L.launch(k, (1,))
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        L.compile_ahead(boom, threads=1)
    L.launch(k, (2,))
    assert [c[0] for c in k.calls] == ["compile", "run"]


@pytest.mark.parametrize("env, expected", [("3", 3), ("1", 1), ("0", None), ("-2", None),
                                           ("many", None), (None, None)])
def test_compile_threads_from_the_environment(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("GRAPHSERVE_COMPILE_THREADS", raising=False)
    else:
        monkeypatch.setenv("GRAPHSERVE_COMPILE_THREADS", env)
    monkeypatch.setattr(L.os, "cpu_count", lambda: 32)
    assert L.compile_threads() == (expected or L.MAX_COMPILE_THREADS)


def test_a_compile_job_returns_its_kernel_even_when_the_launcher_cannot_be_built():
    """Compile jobs also build the kernel's C launcher; here (a fake kernel, no GPU driver) that
    build fails, and the job still hands back the compiled kernel: the first launch builds it."""
    from concurrent.futures import ThreadPoolExecutor

    class Compiled:
        src = metadata = None

    kernel = Compiled()
    with ThreadPoolExecutor(1) as pool:
        assert L._WithLaunchers(pool).submit(lambda: kernel).result() is kernel


def test_the_switch_holds_for_its_own_thread_only():
    """While one thread compiles ahead, a launch on another thread (another engine stepping or
    capturing) runs as usual."""
    import threading

    mine, other = FakeKernel(), FakeKernel()

    def on_this_thread():
        L.launch(mine, (1,))
        t = threading.Thread(target=L.launch, args=(other, (2,)))
        t.start()
        t.join()

    L.compile_ahead(on_this_thread, threads=1)
    assert [c[0] for c in mine.calls] == ["compile"] and [c[0] for c in other.calls] == ["run"]


def test_every_triton_kernel_launches_through_the_door():
    """A `kernel[grid](...)` call bypasses `launch`, so the compile-ahead pass would run it for real
    (compiling it on the caller's thread) instead of compiling it on the pool."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "replica"
    direct = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "launch.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\b_\w*kernel\w*\[[^\]]*\]\(", line)]
    assert not direct, direct
    kernels = [p for p in (root / "kernels").glob("*.py") if "@triton.jit" in p.read_text()]
    assert len(kernels) >= 4 and all("launch(" in p.read_text() for p in kernels), kernels
