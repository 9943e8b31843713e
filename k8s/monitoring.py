"""Monitoring manifests: PodMonitors for the Ray head and workers, and the Grafana dashboard ConfigMap.

Contract:
- `podmonitors(v)` returns two monitoring.coreos.com/v1 PodMonitors (KubeRay's config/prometheus
  pattern) that scrape the container port named `metrics` (8080) on this RayService's pods only
  (selected by `ray.io/node-type` plus the `app.kubernetes.io/name` label the RayService puts on its
  pod templates), copy the pod label `ray.io/cluster` into `ray_io_cluster` (the dashboard filters on
  it), and carry `release: <prometheus release>` for the Prometheus podMonitorSelector. They omit
  `namespaceSelector`, so each watches its own namespace: apply them next to the RayService.
- `dashboard_configmap(v)` wraps `deployments.dashboard.build_dashboard()` in one ConfigMap labelled
  `grafana_dashboard: "1"`, the label the Grafana sidecar of kube-prometheus-stack loads.
"""
from __future__ import annotations

from deployments import dashboard
from k8s.rayservice import NAME_LABEL, Variant

DASHBOARD_KEY = "graphserve.json"


def _podmonitor(v: Variant, node_type: str) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{v.name}-ray-{node_type}",
                     "labels": {NAME_LABEL: v.name, "release": v.prometheus_release}},
        "spec": {
            "selector": {"matchLabels": {"ray.io/node-type": node_type, NAME_LABEL: v.name}},
            "podMetricsEndpoints": [{
                "port": "metrics",
                "relabelings": [{"action": "replace",
                                 "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                 "targetLabel": "ray_io_cluster"}],
            }],
        },
    }


def podmonitors(v: Variant) -> list[dict]:
    return [_podmonitor(v, "head"), _podmonitor(v, "worker")]


def dashboard_configmap(v: Variant) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"grafana-dashboard-{v.name}",
                     "labels": {NAME_LABEL: v.name, "grafana_dashboard": "1"}},
        "data": {DASHBOARD_KEY: dashboard.to_json()},
    }
