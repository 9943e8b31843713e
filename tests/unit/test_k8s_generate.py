"""k8s.generate: the committed manifests are the generator's output, and they follow our GPU policy.

- k8s/*.yaml == render(defaults, deployments/app.yaml), so they cannot drift from the Serve config,
  the metric catalog (through the dashboard) or the generator;
- serveConfigV2 equals deployments/app.yaml except for the declared overlay keys, and its args pass
  the application's own pydantic model;
- head without GPU work, GPU limits == requests, one image whose Ray matches rayVersion and the venv.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import yaml

from deployments import dashboard
from k8s import generate, monitoring, rayservice
from k8s.crd_schema import load_yaml_documents
from k8s.rayservice import K8S_OVERLAY_KEYS, Variant

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


def _load(name: str) -> list[dict]:
    return load_yaml_documents((K8S / name).read_text())


@pytest.fixture(scope="module")
def rs() -> dict:
    (doc,) = _load("rayservice.yaml")
    return doc


def _pods(rs: dict) -> list[dict]:
    c = rs["spec"]["rayClusterConfig"]
    return [c["headGroupSpec"], *c["workerGroupSpecs"]]


def test_committed_manifests_equal_generator_output():
    files = generate.render(Variant(), generate.load_app_config())
    for name, text in files.items():
        assert (K8S / name).read_text() == text, f"k8s/{name} is stale: run `python -m k8s.generate`"
    assert generate.main(["--check"]) == 0


def test_check_flags_drift(tmp_path):
    assert generate.main(["--out-dir", str(tmp_path)]) == 0
    (tmp_path / "podmonitors.yaml").write_text("# edited by hand\n")
    assert generate.main(["--check", "--out-dir", str(tmp_path)]) == 1


def _diff(a, b, path=()) -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _diff(a.get(k), b.get(k), path + (k,))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, path + (i,))]
    return [] if a == b else [path]


def test_serve_config_is_app_yaml_plus_the_declared_overlay(rs):
    local = generate.load_app_config()
    k8s = yaml.safe_load(rs["spec"]["serveConfigV2"])
    index = [a["name"] for a in local["applications"]].index(rayservice.APP_NAME)
    allowed = {(s, k) if s == "http_options" else ("applications", index, s, k) for s, k in K8S_OVERLAY_KEYS}
    changed = set(_diff(local, k8s))
    assert changed <= allowed, f"serveConfigV2 differs from app.yaml outside the overlay: {changed - allowed}"
    app = k8s["applications"][index]
    assert app["name"] == rayservice.APP_NAME and app["import_path"] == "deployments.app:build_app"
    assert app["args"]["model"].startswith(rayservice.MODEL_MOUNT + "/")


def test_overlay_args_pass_the_app_model(rs):
    from deployments.config import AppArgs

    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    parsed = AppArgs.model_validate(args)
    assert parsed.num_gpus_per_replica == 1 and parsed.num_replicas == 1


def test_an_autoscaled_app_keeps_its_range_instead_of_a_replica_count():
    from deployments.config import AppArgs

    local = generate.load_app_config()
    index = [a["name"] for a in local["applications"]].index(rayservice.APP_NAME)
    local["applications"][index]["args"].pop("num_replicas", None)
    local["applications"][index]["args"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    args = rayservice.serve_config_for_k8s(local, Variant(workers=2))["applications"][index]["args"]
    parsed = AppArgs.model_validate(args)
    assert parsed.num_replicas is None and parsed.autoscaling.max_replicas == 3
    assert parsed.num_gpus_per_replica == 1


def test_head_does_no_gpu_work(rs):
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    container = head["template"]["spec"]["containers"][0]
    assert not any(k.endswith("gpu") for k in container["resources"]["limits"])
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]
    assert {p["name"] for p in container["ports"]} >= {"serve", "metrics", "dashboard", "gcs-server"}


def test_gpu_workers_limits_equal_requests_and_schedule_on_gpu_nodes(rs):
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert res["limits"] == res["requests"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/dev/shm", rayservice.MODEL_MOUNT} <= mounts


def test_all_ray_start_params_are_strings(rs):
    for group in _pods(rs):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_one_image_and_ray_version_everywhere(rs):
    images = {c["image"] for g in _pods(rs) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    version = rs["spec"]["rayClusterConfig"]["rayVersion"]
    assert version == ray.__version__
    base = re.search(r"^FROM rayproject/ray:(\S+)", (K8S / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(version + "-") and ("gpu" in base or "-cu" in base)
    assert f'"ray[serve]=={version}"' in (ROOT / "pyproject.toml").read_text()


def test_upgrade_strategy_is_explicit(rs):
    assert rs["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "None")
    assert "serviceUnhealthySecondThreshold" not in rs["spec"]


def test_podmonitors_select_this_rayservice_on_the_metrics_port(rs):
    monitors = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m for m in _load("podmonitors.yaml")}
    assert set(monitors) == {"head", "worker"}
    pods = {"head": rs["spec"]["rayClusterConfig"]["headGroupSpec"],
            "worker": rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]}
    for node_type, mon in monitors.items():
        template = pods[node_type]["template"]
        selector = dict(mon["spec"]["selector"]["matchLabels"])
        selector.pop("ray.io/node-type")                    # KubeRay sets this one on the pod
        assert selector.items() <= template["metadata"]["labels"].items()
        (endpoint,) = mon["spec"]["podMetricsEndpoints"]
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == rayservice.METRICS_PORT
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "ray_io_cluster"
        assert mon["metadata"]["labels"]["release"]


def test_dashboard_configmap_holds_the_generated_dashboard():
    (cm,) = _load("grafana-dashboard-configmap.yaml")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][monitoring.DASHBOARD_KEY]) == dashboard.build_dashboard()


def test_kustomization_lists_every_generated_file_and_names_a_registry():
    (k,) = _load("kustomization.yaml")
    assert set(k["resources"]) == set(generate.OUTPUTS)
    assert k["images"][0]["name"] == Variant().image.split(":")[0]
    assert "/" in k["images"][0]["newName"]           # never a bare name pulled from Docker Hub


def test_the_model_claim_is_read_only_many_and_is_the_one_workers_mount(rs):
    (pvc,) = _load("models-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]


def test_api_keys_come_from_a_secret_mounted_on_every_pod(rs):
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["api_keys_file"] == rayservice.API_KEYS_FILE     # a path; no key in the config
    for group in _pods(rs):
        spec = group["template"]["spec"]
        secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        assert secrets == [Variant().api_keys_secret]
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts[rayservice.API_KEYS_MOUNT]["readOnly"] is True
    assert "sk-" not in rs["spec"]["serveConfigV2"]


def test_the_ingress_asks_for_cpu_the_head_does_not_offer(rs):
    # Serve's SPREAD may place a replica on any node with room for it; the head offers no CPU and
    # has no model volume, so the ingress (which loads the tokenizer from `model`) must need CPU.
    from deployments.app import build_app
    from deployments.config import AppArgs

    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    args = AppArgs.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert build_app(args)._bound_deployment.ray_actor_options["num_cpus"] > 0


def test_variant_scales_gpus_and_replicas(tmp_path):
    argv = ["--out-dir", str(tmp_path), "--workers", "2", "--gpus-per-worker", "4", "--model-path",
            "/models/llama-8b", "--model-claim", "", "--node-selector", "pool=a100", "--upgrade-strategy",
            "None", "--api-keys-secret", ""]
    assert generate.main(argv) == 0
    text = (tmp_path / "rayservice.yaml").read_text()
    assert "--workers 2 --gpus-per-worker 4" in text.splitlines()[0]
    (doc,) = load_yaml_documents(text)
    (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    spec = group["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert spec["nodeSelector"] == {"pool": "a100"}
    assert [v["name"] for v in spec["volumes"]] == ["dshm"]
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (args["num_replicas"], args["model"]) == (8, "/models/llama-8b")
    assert "api_keys_file" not in args and not (tmp_path / "models-pvc.yaml").exists()
    assert doc["spec"]["upgradeStrategy"]["type"] == "None"
