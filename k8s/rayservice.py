"""Build graphserve's RayService (ray.io/v1) from the local Serve config plus a GPU overlay.

Contract: `serve_config_for_k8s(app_config, variant)` takes the parsed deployments/app.yaml and
returns the config that goes into `serveConfigV2`. It changes only what differs on a GPU cluster
(`K8S_OVERLAY_KEYS`): the HTTP bind address/port, and in the graphserve application's `args` the model
path (a checkpoint directory on the model volume), the replica/GPU counts and the API key file (the
mounted Secret; a path, never a key). The counts are explicit because a builder that counts cluster
GPUs at deploy time could run before the GPU pods are up. Everything else is copied unchanged, and a
test keeps it so.

`build_rayservice(variant, serve_config)` returns the manifest: a head that does no GPU work and
offers no CPU to replicas (`num-cpus: "0"`, `num-gpus: "0"`, NVIDIA_VISIBLE_DEVICES=void; the
ingress asks for CPU, so it runs on a worker, next to the model volume) and one GPU worker group
whose `nvidia.com/gpu` limits equal its requests, with the toleration and node selector taken from
the variant, /dev/shm in memory and the model volume mounted read-only. The API key Secret is
mounted read-only on every pod. `models_pvc(variant)` is the model volume's claim: ReadOnlyMany, so
the second cluster of a blue/green upgrade can mount it while the first still runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

APP_NAME = "graphserve"
SERVE_PORT = 8000
METRICS_PORT = 8080            # KubeRay's metrics-export-port
MODEL_MOUNT = "/models"
API_KEYS_MOUNT = "/etc/graphserve/api-keys"
API_KEYS_FILE = f"{API_KEYS_MOUNT}/keys"      # the Secret's key `keys`: one API key per line
NAME_LABEL = "app.kubernetes.io/name"
# (section, key) pairs the overlay may change; a test asserts nothing else differs from app.yaml.
K8S_OVERLAY_KEYS = (("http_options", "host"), ("http_options", "port"), ("args", "model"),
                    ("args", "num_replicas"), ("args", "num_gpus_per_replica"),
                    ("args", "api_keys_file"))


@dataclass(frozen=True)
class Variant:
    """The knobs of one deployment target; defaults produce the committed k8s/rayservice.yaml."""
    name: str = "graphserve"                       # RayService name (<= 47 chars, DNS-1035)
    image: str = "graphserve:0.1.0"                # same image everywhere; kustomize `images:` retags it
    ray_version: str = "2.60.0"                    # must match the image's Ray
    workers: int = 1                               # GPU worker pods
    gpus_per_worker: int = 1                       # nvidia.com/gpu per pod; one replica per GPU
    worker_cpu: str = "8"
    worker_memory: str = "48Gi"
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    model_path: str = f"{MODEL_MOUNT}/model"       # checkpoint directory as the worker sees it
    model_claim: Optional[str] = "graphserve-models"   # PVC mounted at /models; None: no volume
    model_storage: str = "100Gi"                   # the PVC's size
    model_storage_class: Optional[str] = None      # None: the cluster's default StorageClass
    # Secret with the API keys (key `keys`, one per line); None: no authentication.
    api_keys_secret: Optional[str] = "graphserve-api-keys"
    node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: tuple = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    upgrade_strategy: str = "NewCluster"           # None when the GPU quota cannot hold two clusters
    prometheus_release: str = "prometheus"         # label the Prometheus podMonitorSelector matches


def serve_config_for_k8s(app_config: dict, v: Variant) -> dict:
    config = copy.deepcopy(app_config)
    config.setdefault("http_options", {}).update({"host": "0.0.0.0", "port": SERVE_PORT})
    apps = [a for a in config.get("applications") or [] if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"deployments/app.yaml must define exactly one application named {APP_NAME!r}")
    args = apps[0].setdefault("args", {})
    args.update({"model": v.model_path, "num_gpus_per_replica": 1})
    if not args.get("autoscaling"):    # an autoscaled app keeps its range (AppArgs refuses both)
        args["num_replicas"] = v.workers * v.gpus_per_worker
    if v.api_keys_secret:
        apps[0]["args"]["api_keys_file"] = API_KEYS_FILE
    return config


class _ServeDumper(yaml.SafeDumper):
    """Block style, except lists of scalars in flow style (`batch_buckets: [1, 2, 4]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, (dict, list)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ServeDumper.add_representer(list, _represent_list)


def serve_config_text(config: dict) -> str:
    return yaml.dump(config, Dumper=_ServeDumper, sort_keys=False, width=100)


def _secret_volume(v: Variant) -> tuple[list[dict], list[dict]]:
    """(volumeMounts, volumes) for the API key Secret; empty without one."""
    if not v.api_keys_secret:
        return [], []
    return ([{"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True}],
            [{"name": "api-keys", "secret": {"secretName": v.api_keys_secret}}])


def _head(v: Variant) -> dict:
    ports = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", SERVE_PORT),
             ("metrics", METRICS_PORT)]
    container = {
        "name": "ray-head", "image": v.image,
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "resources": {"limits": {"cpu": v.head_cpu, "memory": v.head_memory},
                      "requests": {"cpu": v.head_cpu, "memory": v.head_memory}},
        # The head may land on a GPU node: without this it would see every GPU there (ray#29753).
        "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}],
    }
    mounts, volumes = _secret_volume(v)
    spec: dict[str, Any] = {"containers": [container]}
    if mounts:
        container["volumeMounts"], spec["volumes"] = mounts, volumes
    return {
        # No replicas and no GPU accounting on the head; all values are strings (map[string]string).
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
        "template": {"metadata": {"labels": {NAME_LABEL: v.name}}, "spec": spec},
    }


def _worker(v: Variant) -> dict:
    res = {"cpu": v.worker_cpu, "memory": v.worker_memory, "nvidia.com/gpu": str(v.gpus_per_worker)}
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if v.model_claim:
        mounts.append({"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True})
        volumes.append({"name": "models",
                        "persistentVolumeClaim": {"claimName": v.model_claim, "readOnly": True}})
    secret_mounts, secret_volumes = _secret_volume(v)
    mounts += secret_mounts
    volumes += secret_volumes
    container = {
        "name": "ray-worker", "image": v.image,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # KubeRay turns the GPU *limit* into --num-gpus; requests are set equal on purpose.
        "resources": {"limits": dict(res), "requests": dict(res)},
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes,
                            "tolerations": [dict(t) for t in v.tolerations]}
    if v.node_selector:
        spec["nodeSelector"] = dict(v.node_selector)
    return {
        "groupName": "gpu",
        "replicas": v.workers, "minReplicas": v.workers, "maxReplicas": v.workers,
        "rayStartParams": {},
        "template": {"metadata": {"labels": {NAME_LABEL: v.name}}, "spec": spec},
    }


def models_pvc(v: Variant) -> dict:
    """The model volume's claim. ReadOnlyMany: every worker pod, and the second cluster of a
    blue/green upgrade, mount it at once. Bind it to a volume that already holds the checkpoint
    (a pre-populated PersistentVolume, or `dataSource` from a VolumeSnapshot)."""
    spec: dict[str, Any] = {"accessModes": ["ReadOnlyMany"],
                            "resources": {"requests": {"storage": v.model_storage}}}
    if v.model_storage_class:
        spec["storageClassName"] = v.model_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": v.model_claim, "labels": {NAME_LABEL: v.name}}, "spec": spec}


def build_rayservice(v: Variant, serve_config: dict) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": v.name, "labels": {NAME_LABEL: v.name}},
        "spec": {
            # NewCluster: zero-downtime blue/green, which needs room for a second GPU cluster while
            # it runs; "None" skips rolling out rayClusterConfig changes (serveConfigV2 still applies).
            "upgradeStrategy": {"type": v.upgrade_strategy},
            "serveConfigV2": serve_config_text(serve_config),
            "rayClusterConfig": {
                "rayVersion": v.ray_version,
                "enableInTreeAutoscaling": False,
                "headGroupSpec": _head(v),
                "workerGroupSpecs": [_worker(v)],
            },
        },
    }
