"""`serve run deployments/app.yaml` from the repo root starts the whole app, and it answers.

The CLI runs as a subprocess against the session's cluster (`--address`), so it shares the one
Ray/Serve start-up of this test run; Serve is already up there, so the YAML's http_options are
ignored (with a warning) and the app answers on the fixture's port. On the cluster's 2 fake GPUs
the default args give one replica per GPU, each pinned to its own, and as many ingress replicas.
The CLI is stopped with SIGTERM: its Ctrl-C handler would call `serve.shutdown()` on the shared
instance.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from deployments.app import APP_NAME
from serve_helpers import wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
APP_YAML = REPO / "deployments" / "app.yaml"


@pytest.fixture
def serve_run(ray_cluster, tmp_path):
    from ray import serve

    serve_cli = shutil.which("serve", path=str(pathlib.Path(sys.executable).parent))
    log = open(tmp_path / "serve_run.log", "w")
    proc = subprocess.Popen([serve_cli, "run", "deployments/app.yaml", "--address",
                             ray_cluster.gcs_address], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, tmp_path / "serve_run.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        serve.delete(APP_NAME)


def test_serve_run_app_yaml_starts_and_answers(serve_run, ray_cluster):
    from ray import serve

    proc, log = serve_run
    url = ray_cluster.base_url

    def ready():
        assert proc.poll() is None, f"serve run exited:\n{log.read_text()[-4000:]}"
        return httpx.get(f"{url}/health", timeout=5).status_code == 200

    # The readiness probe a client (or KubeRay) waits on: the ingress answers /v1/models as soon
    # as it runs, but a completion sent before any LLMReplica runs is a 503 after the replica wait.
    wait_for(ready, 150, "the app deployed by `serve run deployments/app.yaml` to be ready")
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    resp = httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": "random:tiny", "prompt": ["Hello", "there"], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 2

    ladder = yaml.safe_load(APP_YAML.read_text())["applications"][0]["args"]["batch_buckets"]
    if ladder is None:   # each engine sizes its own: on these CPU replicas, the ladder up to 64 rows
        from replica.config import DEFAULT_CPU_ROWS, ladder_up_to
        ladder = list(ladder_up_to(DEFAULT_CPU_ROWS))
    handle = serve.get_deployment_handle("LLMReplica", APP_NAME)

    def both_replicas():
        reports = handle.broadcast("counters").results()
        return reports if len(reports) == 2 else None

    replicas = wait_for(both_replicas, 60, "both LLMReplica replicas (one per fake GPU) to be up")
    assert all(r["captured_buckets"] == ladder for r in replicas)
    assert sorted(r["gpu_ids"][0] for r in replicas) == ["0", "1"]
    # one GPU each: distinct device keys, so the router charges neither for the other's work
    assert sorted(r["device"].rsplit(":", 1)[1] for r in replicas) == ["0", "1"]
    ingress = serve.get_deployment_handle("OpenAIIngress", APP_NAME)   # one per GPU replica, by default
    wait_for(lambda: len({r["pid"] for r in ingress.broadcast("counters").results()}) == 2, 60,
             "two OpenAIIngress replicas (the default on two GPUs) to be up")
    _run_readme_examples(ray_cluster)


def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [b for b in blocks if "OpenAI(" in b or "get_app_handle" in b]


def _run_readme_examples(ray_cluster) -> None:
    """The README's client examples, as written, against this app (only the address differs:
    this test's ports, and the session cluster's GCS address for "auto", since "auto" could find
    another cluster on a shared host)."""
    blocks = _readme_blocks()
    assert len(blocks) == 2, "expected the README's openai and handle examples"
    for block in blocks:
        code = (block.replace("http://localhost:8000", ray_cluster.base_url)
                .replace('address="auto"', f'address="{ray_cluster.gcs_address}"'))
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, f"README example failed:\n{block}\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip(), block
