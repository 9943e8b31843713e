"""Structural checks for the manifests whose CRDs/OpenAPI schemas are not available offline.

Contract: each `check_*(doc, ...)` returns a list of error strings (empty when the document is fine).
They are deliberately narrower than a schema: apiVersion/kind/metadata shape, string-valued labels,
unknown top-level and spec keys against an allowlist taken from the upstream API types, and the few
fields our setup depends on (a PodMonitor's selector and named port; a Grafana dashboard ConfigMap's
label and parseable JSON; a kustomization's resource files existing and every image it retags
pointing at a registry; a PersistentVolumeClaim's access modes and size).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CONFIGMAP_MAX_BYTES = 1024 * 1024          # etcd's object limit; the reason for one ConfigMap per dashboard

# prometheus-operator monitoring.coreos.com/v1 PodMonitorSpec / PodMetricsEndpoint / RelabelConfig.
PODMONITOR_SPEC_KEYS = {
    "jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "selectorMechanism",
    "namespaceSelector", "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit",
    "scrapeProtocols", "fallbackScrapeProtocol", "scrapeClassicHistograms", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "convertClassicHistogramsToNHCB"}
PODMETRICS_ENDPOINT_KEYS = {
    "port", "portNumber", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
    "honorLabels", "honorTimestamps", "trackTimestampsStaleness", "metricRelabelings", "relabelings",
    "proxyUrl", "enableHttp2", "filterRunning", "followRedirects", "basicAuth", "bearerTokenSecret",
    "authorization", "oauth2", "tlsConfig", "noProxy", "proxyFromEnvironment", "proxyConnectHeader"}
RELABEL_KEYS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                   "lowercase", "uppercase", "keepequal", "dropequal"}
LABEL_SELECTOR_KEYS = {"matchLabels", "matchExpressions"}
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "metadata", "resources", "namespace", "namePrefix", "nameSuffix",
    "commonLabels", "labels", "commonAnnotations", "images", "patches", "patchesStrategicMerge",
    "patchesJson6902", "configMapGenerator", "secretGenerator", "generatorOptions", "components",
    "replicas", "replacements", "crds", "configurations", "transformers", "generators",
    "buildMetadata", "openapi", "sortOptions", "helmCharts", "vars"}


def _string_map(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{where}: must be a map of strings"]
    return [f"{where}/{k}: value {v!r} must be a string (quote it in YAML)"
            for k, v in value.items() if not isinstance(v, str)]


def check_common(doc: dict, *, name_required: bool = True) -> list[str]:
    """apiVersion and kind are strings; metadata has a DNS-1123 name and string labels/annotations."""
    errors = [f"/{k}: required string" for k in ("apiVersion", "kind") if not isinstance(doc.get(k), str)]
    meta = doc.get("metadata")
    if meta is None and not name_required:
        return errors
    if not isinstance(meta, dict):
        return errors + ["/metadata: required map"]
    name = meta.get("name")
    if name_required and not (isinstance(name, str) and len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"/metadata/name: {name!r} is not a DNS-1123 subdomain")
    ns = meta.get("namespace")
    if ns is not None and not (isinstance(ns, str) and len(ns) <= 63 and DNS1123_LABEL.match(ns)):
        errors.append(f"/metadata/namespace: {ns!r} is not a DNS-1123 label")
    errors += _string_map(meta.get("labels"), "/metadata/labels")
    errors += _string_map(meta.get("annotations"), "/metadata/annotations")
    return errors


def _unknown(keys: Any, allowed: set[str], where: str) -> list[str]:
    return [f"{where}/{k}: unknown field" for k in (keys or {}) if k not in allowed]


def check_configmap(doc: dict) -> list[str]:
    errors = check_common(doc)
    if doc.get("apiVersion") != "v1":
        errors.append(f"/apiVersion: ConfigMap is v1, not {doc.get('apiVersion')!r}")
    errors += _unknown(doc, {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}, "")
    data = doc.get("data") or {}
    errors += _string_map(data, "/data")
    size = sum(len(str(k)) + len(str(v).encode()) for k, v in data.items())
    if size > CONFIGMAP_MAX_BYTES:
        errors.append(f"/data: {size} bytes exceeds the 1 MiB ConfigMap limit; split it")
    labels = (doc.get("metadata") or {}).get("labels") or {}
    if "grafana_dashboard" in labels:
        errors += _check_dashboard_data(data)
    return errors


def _check_dashboard_data(data: dict) -> list[str]:
    if not data:
        return ["/data: a grafana_dashboard ConfigMap needs at least one <name>.json key"]
    errors = []
    for key, text in data.items():
        if not key.endswith(".json"):
            errors.append(f"/data/{key}: dashboard keys must end in .json (the sidecar writes files)")
            continue
        try:
            dash = json.loads(text)
        except (TypeError, ValueError) as e:
            errors.append(f"/data/{key}: not valid JSON: {e}")
            continue
        errors += [f"/data/{key}: dashboard has no {k!r}" for k in ("uid", "title", "panels") if k not in dash]
    return errors


def _check_relabelings(items: Any, where: str) -> list[str]:
    if items is None:
        return []
    if not isinstance(items, list):
        return [f"{where}: must be a list"]
    errors = []
    for i, rl in enumerate(items):
        if not isinstance(rl, dict):
            errors.append(f"{where}/{i}: must be a map")
            continue
        errors += _unknown(rl, RELABEL_KEYS, f"{where}/{i}")
        action = rl.get("action", "replace")
        if str(action).lower() not in RELABEL_ACTIONS:
            errors.append(f"{where}/{i}/action: {action!r} is not a relabel action")
    return errors


def check_podmonitor(doc: dict) -> list[str]:
    errors = check_common(doc)
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        errors.append(f"/apiVersion: PodMonitor is monitoring.coreos.com/v1, not {doc.get('apiVersion')!r}")
    errors += _unknown(doc, {"apiVersion", "kind", "metadata", "spec"}, "")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["/spec: required map"]
    errors += _unknown(spec, PODMONITOR_SPEC_KEYS, "/spec")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector:
        errors.append("/spec/selector: required; an empty selector would scrape every pod")
    else:
        errors += _unknown(selector, LABEL_SELECTOR_KEYS, "/spec/selector")
        errors += _string_map(selector.get("matchLabels"), "/spec/selector/matchLabels")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return errors + ["/spec/podMetricsEndpoints: required non-empty list"]
    for i, ep in enumerate(endpoints):
        where = f"/spec/podMetricsEndpoints/{i}"
        if not isinstance(ep, dict):
            errors.append(f"{where}: must be a map")
            continue
        errors += _unknown(ep, PODMETRICS_ENDPOINT_KEYS, where)
        if not isinstance(ep.get("port"), str):
            errors.append(f"{where}/port: required container port *name* (a string such as 'metrics')")
        errors += _check_relabelings(ep.get("relabelings"), f"{where}/relabelings")
        errors += _check_relabelings(ep.get("metricRelabelings"), f"{where}/metricRelabelings")
    return errors


PVC_SPEC_KEYS = {"accessModes", "selector", "resources", "volumeName", "storageClassName",
                 "volumeMode", "dataSource", "dataSourceRef", "volumeAttributesClassName"}
ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def check_pvc(doc: dict) -> list[str]:
    errors = check_common(doc)
    if doc.get("apiVersion") != "v1":
        errors.append(f"/apiVersion: PersistentVolumeClaim is v1, not {doc.get('apiVersion')!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["/spec: required map"]
    errors += _unknown(spec, PVC_SPEC_KEYS, "/spec")
    modes = spec.get("accessModes")
    if not isinstance(modes, list) or not modes or not set(modes) <= ACCESS_MODES:
        errors.append(f"/spec/accessModes: {modes!r} must be a non-empty list of {sorted(ACCESS_MODES)}")
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if not (isinstance(storage, str) and QUANTITY.match(storage)):
        errors.append(f"/spec/resources/requests/storage: {storage!r} is not a quantity like '100Gi'")
    return errors


def _image_errors(images) -> list[str]:
    """Every image the kustomization retags must name a registry (`newName: host/path`), or
    `kubectl apply -k` pulls a bare name from Docker Hub."""
    errors = []
    for i, image in enumerate(images if isinstance(images, list) else []):
        if not isinstance(image, dict):
            continue
        target = str(image.get("newName") or image.get("name") or "")
        if "/" not in target:
            errors.append(f"/images/{i}: {target!r} has no registry; set newName, e.g. "
                          f"registry.example.com/{target}")
    return errors


def check_kustomization(doc: dict, base_dir: Path | None) -> list[str]:
    errors = check_common(doc, name_required=False)
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        errors.append(f"/apiVersion: use kustomize.config.k8s.io/v1beta1, not {doc.get('apiVersion')!r}")
    errors += _unknown(doc, KUSTOMIZATION_KEYS, "")
    errors += _image_errors(doc.get("images"))
    resources = doc.get("resources") or []
    if not isinstance(resources, list):
        return errors + ["/resources: must be a list"]
    for res in resources:
        local = isinstance(res, str) and "://" not in res and not res.startswith("github.com/")
        if base_dir is not None and local and not (base_dir / res).exists():
            errors.append(f"/resources: {res!r} does not exist next to the kustomization")
    return errors
