"""KubeRay placement, simulated: the ingress never lands on a head that offers no CPU.

On KubeRay the head runs with `num-cpus: "0"` and without the model volume; an ingress asking for
no CPU could be placed there by Serve's SPREAD strategy and then fail to load the tokenizer
(issue 9 saw 23 of 30 deploys place it there, 3 end DEPLOY_FAILED). The ingress now asks for
`ingress_num_cpus` (> 0), which the head cannot offer.

A driver subprocess (this file with `--driver`; a second Ray cluster cannot share the pytest
process with the session cluster) starts `ray.cluster_utils.Cluster`: a head with 0 CPUs and 0
GPUs and two worker nodes with 2 CPUs and 1 fake GPU each. It deploys the whole app DEPLOYS (30)
times, three apps at a time (the ingress with the random:tiny tokenizer, the decode replica on a
fake GPU with a stand-in engine that starts at once), checks that each deploy is RUNNING, that its
ingress answers through a handle (it tokenizes, so it found its model files), and that no ingress
replica is on the head, then deletes it. A control deployment of 16 trivial 0-CPU replicas (the
old ingress setting) must put some on the head: the check can see the failure it guards against.

Time on the shared 2-core machine: 253 s in a full-suite run (load average ~3; the whole suite took
6.9 min), 5.4 min under a load average of ~18. Nearly all of it is replica process start-up: each
ingress imports torch and transformers through `replica.tokenizer` -> `replica.presets`.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOYS = int(os.environ.get("PLACEMENT_DEPLOYS", "30"))
CONCURRENT = 3          # apps deployed at once (start-up waits overlap)
INGRESS_REPLICAS = 1


MARK = "@@placement "


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(app_name: str, deployment: str) -> list[dict]:
    """The app's live replica actors of `deployment` (from the GCS actor table)."""
    import ray._private.state as state

    return [a for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{app_name}:{deployment}"]


def _ingress_nodes(app_name: str) -> list[str]:
    return [a["Address"]["NodeID"] for a in _alive(app_name, "OpenAIIngress")]


def _probe_class():
    from ray import serve

    @serve.deployment(name="Probe")
    class Probe:
        def __call__(self) -> str:
            return "ok"

    return Probe


def _deploy_round(serve, build, names: list[str], head: str, report: dict) -> None:
    """Deploy `names` at once (each the whole app), check each, delete them."""
    from ray.serve import RunTarget

    try:
        serve.run_many([RunTarget(build(), name=n, route_prefix=None) for n in names])
    except Exception as e:  # noqa: BLE001 - DEPLOY_FAILED is the finding; checked per app below
        report["errors"].append(f"{type(e).__name__}: {str(e)[:300]}")
    status = serve.status().applications
    for n in names:
        app_status = str(getattr(status.get(n), "status", "MISSING"))
        nodes = _ingress_nodes(n)
        try:   # the ingress tokenizes, so an answer proves it found its model files
            res = serve.get_app_handle(n).generate.remote(["hi"], max_tokens=2).result(timeout_s=60)
            answered = len(res.completions) == 1
        except Exception as e:  # noqa: BLE001
            answered = f"{type(e).__name__}: {str(e)[:200]}"
        if not app_status.endswith("RUNNING") or answered is not True or len(nodes) != INGRESS_REPLICAS:
            report["failed"].append([n, app_status, answered, len(nodes)])
        report["on_head"] += sum(node == head for node in nodes)
        report["deploys"] += 1
    for n in names:
        serve.delete(n)


def driver_main() -> None:
    sys.path.insert(0, str(ROOT))
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app
    from deployments.config import AppArgs

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "gcs_server_port": _free_port(), "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    head = cluster.head_node.node_id
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    args = AppArgs(model="random:tiny", batch_buckets=[1, 2], max_seq_len=128, num_replicas=1,
                   num_gpus_per_replica=0.5, ingress_replicas=INGRESS_REPLICAS, ingress_num_cpus=0.5,
                   engine_class="replica.instant_engine:InstantEngine")
    report = {"deploys": 0, "failed": [], "errors": [], "on_head": 0,
              "seconds": {"cluster": round(time.monotonic() - started, 1)}}
    t0 = time.monotonic()
    for r in range(0, DEPLOYS, CONCURRENT):
        names = [f"placement-{i}" for i in range(r, min(r + CONCURRENT, DEPLOYS))]
        _deploy_round(serve, lambda: build_app(args), names, head, report)
    report["seconds"]["deploys"] = round(time.monotonic() - t0, 1)
    # Control: 0-CPU replicas (the old ingress setting) do land on the CPU-less head.
    t0 = time.monotonic()
    serve.run(_probe_class().options(num_replicas=16, ray_actor_options={"num_cpus": 0}).bind(),
              name="control", route_prefix=None)
    report["control_on_head"] = sum(a["Address"]["NodeID"] == head for a in _alive("control", "Probe"))
    serve.delete("control")
    report["seconds"]["control"] = round(time.monotonic() - t0, 1)
    report["seconds"]["total"] = round(time.monotonic() - started, 1)
    print(MARK + json.dumps(report), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.timeout(900)
def test_the_ingress_never_lands_on_a_cpu_less_head_in_30_deploys(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    log = tmp_path / "driver.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "--driver"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=err, timeout=880)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and lines, log.read_text()[-4000:]
    report = json.loads(lines[-1][len(MARK):])
    print("placement report:", report)
    assert report["failed"] == [] and report["deploys"] == DEPLOYS, report
    assert report["on_head"] == 0, report
    assert report["control_on_head"] > 0, f"the control never reached the head: {report}"


if __name__ == "__main__" and sys.argv[1:2] == ["--driver"]:
    driver_main()
