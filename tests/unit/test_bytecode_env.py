"""replica.process_worker.bytecode_env: the engine process caches its bytecode under a prefix when
torch ships without .pyc files (the GPU image: PYTHONDONTWRITEBYTECODE=1, no __pycache__), and
leaves the environment alone otherwise. The last test starts a real interpreter with it."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from replica import process_worker as pw


@pytest.fixture
def torch_without_bytecode(tmp_path, monkeypatch):
    """find_spec('torch') answers a source file that has no .pyc beside it."""
    src = tmp_path / "torch" / "__init__.py"
    src.parent.mkdir()
    src.write_text("")
    monkeypatch.setattr(pw.importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(src)))
    return src


def test_missing_bytecode_gets_a_cache_prefix_and_may_write(torch_without_bytecode, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    env = pw.bytecode_env({"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "PYTHONPYCACHEPREFIX": "/home/someone/.cache/graphserve/pycache"}
    env = pw.bytecode_env({"PYTHONDONTWRITEBYTECODE": "1", pw.PYCACHE_ENV: "/var/cache/gs"})
    assert env["PYTHONPYCACHEPREFIX"] == "/var/cache/gs" and "PYTHONDONTWRITEBYTECODE" not in env


@pytest.mark.parametrize("given", [{"PYTHONPYCACHEPREFIX": "/mine", "PYTHONDONTWRITEBYTECODE": "1"},
                                   {pw.PYCACHE_ENV: "off", "PYTHONDONTWRITEBYTECODE": "1"}])
def test_a_callers_choice_is_kept(torch_without_bytecode, given):
    assert pw.bytecode_env(dict(given)) == given


def test_torch_with_bytecode_beside_it_is_left_alone(torch_without_bytecode):
    pyc = pw.importlib.util.cache_from_source(str(torch_without_bytecode))
    os.makedirs(os.path.dirname(pyc))
    open(pyc, "wb").close()
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert pw.bytecode_env(dict(env)) == env


def test_the_child_writes_bytecode_under_the_prefix_only(tmp_path, torch_without_bytecode):
    pkg = tmp_path / "lib" / "some_module.py"
    pkg.parent.mkdir()
    pkg.write_text("X = 1\n")
    env = pw.bytecode_env({**os.environ, "PYTHONDONTWRITEBYTECODE": "1", pw.PYCACHE_ENV: str(tmp_path / "cache"),
                           "PYTHONPATH": str(pkg.parent)})
    subprocess.run([sys.executable, "-c", "import some_module"], env=env, check=True)
    cached = list((tmp_path / "cache").rglob("some_module*.pyc"))
    assert len(cached) == 1
    assert not (pkg.parent / "__pycache__").exists()
