"""Validate Kubernetes manifests offline: KubeRay kinds strictly against their CRDs, others structurally.

Usage: python -m k8s.validate [--crds DIR] FILE_OR_DIR...   (exit 1 if any document has an error)

Contract: `validate_file(path, crds)` returns one `Report` per YAML document. For ray.io kinds
(RayService, RayCluster, RayJob) a document is first normalized like the apiserver would (nulls
pruned, CRD defaults applied; `k8s.crd_schema`), then validated with Draft 4 against the CRD's
v1 openAPIV3Schema made strict (unknown fields rejected). Then come the checks a CRD cannot express
(docs: kuberay.md section 3): serveConfigV2 through Ray's ServeDeploySchema and its unknown keys,
a DNS-1035 name of at most 47 characters, a known upgradeStrategy type, a head port named `serve`
matching Serve's HTTP port, GPU limits equal to requests, string rayStartParams without `labels`
or resources set twice, rayVersion equal to an official image's tag. ray.io/v1alpha1 is rejected.
ConfigMap, PodMonitor, PersistentVolumeClaim and Kustomization documents get `k8s.structural`
checks; other kinds fail.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import jsonschema

from k8s import serve_check, structural
from k8s.crd_schema import CrdVersion, load_crds, load_yaml_documents, normalize

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay" / "crds"
RAY_KINDS = ("RayService", "RayCluster", "RayJob")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
MAX_RAYSERVICE_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
DEPRECATED_SPEC_FIELDS = ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold")
OFFICIAL_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-llm|-ml)?:(\d+\.\d+\.\d+)")


@dataclass
class Report:
    source: str
    kind: str
    name: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _schema_errors(doc: dict, crd: CrdVersion) -> list[str]:
    validator = jsonschema.Draft4Validator(crd.schema)
    errors = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = "/" + "/".join(map(str, err.absolute_path))
        errors.append(f"{path}: {err.message}")
    return errors


def _groups(cluster: dict, where: str) -> Iterator[tuple[str, dict]]:
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        yield f"{where}/headGroupSpec", head
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(group, dict):
            yield f"{where}/workerGroupSpecs/{i}", group


def _containers(group: dict) -> list[dict]:
    spec = (group.get("template") or {}).get("spec") or {}
    return [c for c in spec.get("containers") or [] if isinstance(c, dict)]


def _gpu_errors(container: dict, where: str) -> list[str]:
    res = container.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    errors = []
    for name in sorted(set(limits) | set(requests)):
        if not name.lower().endswith("gpu"):
            continue
        if name not in limits:
            errors.append(f"{where}/resources: {name} is requested but not limited; KubeRay derives "
                          f"--num-gpus from limits, and Kubernetes requires limits for extended resources")
        elif name in requests and str(requests[name]) != str(limits[name]):
            errors.append(f"{where}/resources: {name} limits ({limits[name]}) != requests ({requests[name]})")
    return errors


def _start_param_errors(group: dict, where: str) -> list[str]:
    params = group.get("rayStartParams") or {}
    errors = [f"{where}/rayStartParams/{k}: {v!r} must be a string (quote it: \"{v}\")"
              for k, v in params.items() if not isinstance(v, str)]
    if "labels" in params:
        errors.append(f"{where}/rayStartParams/labels: not allowed; use the group's `labels:` field")
    both = [k for k in RESOURCE_START_PARAMS if k in params]
    if both and group.get("resources"):
        errors.append(f"{where}: {both} set in rayStartParams and a `resources:` map too; use one")
    return errors


def cluster_checks(cluster: dict, where: str, report: Report) -> dict[str, Any]:
    """Checks shared by every ray.io kind; returns facts RayService checks need."""
    facts: dict[str, Any] = {"head_ports": None, "max_worker_gpus": 0.0}
    version = cluster.get("rayVersion")
    for gwhere, group in _groups(cluster, where):
        report.errors += _start_param_errors(group, gwhere)
        for ci, container in enumerate(_containers(group)):
            cwhere = f"{gwhere}/template/spec/containers/{ci}"
            report.errors += _gpu_errors(container, cwhere)
            m = OFFICIAL_IMAGE.match(str(container.get("image", "")))
            if m and version and m.group(1) != version:
                report.errors.append(f"{cwhere}/image: Ray {m.group(1)} but rayVersion is {version}")
            if "rayproject/ray-ml" in str(container.get("image", "")):
                report.warnings.append(f"{cwhere}/image: rayproject/ray-ml is discontinued after 2.49")
        ray_container = (_containers(group) or [{}])[0]
        if gwhere.endswith("headGroupSpec"):
            if "ports" in ray_container:
                facts["head_ports"] = {p.get("name"): p.get("containerPort")
                                       for p in ray_container.get("ports") or [] if isinstance(p, dict)}
        else:
            limits = (ray_container.get("resources") or {}).get("limits") or {}
            gpus = [float(v) for k, v in limits.items() if k.lower().endswith("gpu")
                    and re.fullmatch(r"\d+(\.\d+)?", str(v))]
            facts["max_worker_gpus"] = max([facts["max_worker_gpus"], *gpus])
    return facts


def rayservice_checks(doc: dict, report: Report) -> None:
    name = (doc.get("metadata") or {}).get("name")
    if not (isinstance(name, str) and DNS1035.match(name) and len(name) <= MAX_RAYSERVICE_NAME):
        report.errors.append(f"/metadata/name: {name!r} must be a DNS-1035 label of at most "
                             f"{MAX_RAYSERVICE_NAME} characters (KubeRay appends a suffix)")
    spec = doc.get("spec") or {}
    report.warnings += [f"/spec/{k}: deprecated and unused since KubeRay 1.1 (kuberay#1685); remove it"
                        for k in DEPRECATED_SPEC_FIELDS if k in spec]
    strategy = spec.get("upgradeStrategy") or {}
    utype = strategy.get("type")
    if utype is not None and utype not in UPGRADE_TYPES:
        report.errors.append(f"/spec/upgradeStrategy/type: {utype!r} is not one of {UPGRADE_TYPES}")
    cluster = spec.get("rayClusterConfig") or {}
    if utype == "NewClusterWithIncrementalUpgrade":
        opts = strategy.get("clusterUpgradeOptions") or {}
        missing = [k for k in ("gatewayClassName", "stepSizePercent", "intervalSeconds", "maxSurgePercent")
                   if k not in opts]
        if missing:
            report.errors.append(f"/spec/upgradeStrategy/clusterUpgradeOptions: missing {missing}")
        if not cluster.get("enableInTreeAutoscaling"):
            report.errors.append("/spec/rayClusterConfig/enableInTreeAutoscaling: incremental upgrades "
                                 "need autoscaling")
    facts = cluster_checks(cluster, "/spec/rayClusterConfig", report)
    _serve_checks(spec, facts, report)


def _serve_checks(spec: dict, facts: dict, report: Report) -> None:
    ports = facts["head_ports"]
    if ports is not None and "serve" not in ports:
        report.errors.append("/spec/rayClusterConfig/headGroupSpec: head container lists ports but none "
                             "named 'serve'; the operator will not build the serve Service")
    if "serveConfigV2" not in spec:
        report.warnings.append("/spec/serveConfigV2: absent; the RayService deploys no application")
        return
    config, errors = serve_check.check_serve_config(spec["serveConfigV2"])
    report.errors += errors
    if config is None:
        return
    want = serve_check.http_port(config)
    if ports and "serve" in ports and ports["serve"] != want:
        report.errors.append(f"/spec/serveConfigV2/http_options/port: Serve listens on {want} but the "
                             f"head port 'serve' is {ports['serve']}")
    for dep, gpus in serve_check.actor_gpus(config):
        if gpus > facts["max_worker_gpus"]:
            report.errors.append(f"/spec/serveConfigV2: {dep} asks for {gpus:g} GPUs per replica; the "
                                 f"largest worker pod has {facts['max_worker_gpus']:g}")


def validate_document(doc: Any, crds: Optional[dict], source: str = "<doc>",
                      base_dir: Optional[Path] = None) -> Report:
    if not isinstance(doc, dict):
        return Report(source, "?", "?", errors=["document is not a mapping"])
    kind = str(doc.get("kind", "?"))
    report = Report(source, kind, str((doc.get("metadata") or {}).get("name", "")))
    if kind in RAY_KINDS:
        _validate_ray_kind(doc, crds, report)
    elif kind == "ConfigMap":
        report.errors += structural.check_configmap(doc)
    elif kind == "PodMonitor":
        report.errors += structural.check_podmonitor(doc)
    elif kind == "Kustomization":
        report.errors += structural.check_kustomization(doc, base_dir)
    elif kind == "PersistentVolumeClaim":
        report.errors += structural.check_pvc(doc)
    else:
        report.errors.append(f"/kind: no schema for {kind!r}; this validator knows {RAY_KINDS} and "
                             f"ConfigMap, PodMonitor, PersistentVolumeClaim, Kustomization")
    return report


def _validate_ray_kind(doc: dict, crds: Optional[dict], report: Report) -> None:
    if crds is None:
        report.errors.append("no CRDs loaded; pass --crds")
        return
    crd = crds.get((doc.get("apiVersion"), report.kind))
    if crd is None:
        report.errors.append(f"/apiVersion: {doc.get('apiVersion')!r} is not a served version of {report.kind}")
        return
    if crd.deprecated:
        report.errors.append(f"/apiVersion: {crd.api_version} is deprecated; use ray.io/v1")
        return
    normalized, report.warnings = normalize(doc, crd.schema)
    report.errors += _schema_errors(normalized, crd)
    if report.kind == "RayService":
        rayservice_checks(normalized, report)
    elif report.kind == "RayCluster":
        cluster_checks(normalized.get("spec") or {}, "/spec", report)
    elif isinstance((normalized.get("spec") or {}).get("rayClusterSpec"), dict):
        cluster_checks(normalized["spec"]["rayClusterSpec"], "/spec/rayClusterSpec", report)


def validate_file(path: Path, crds: Optional[dict]) -> list[Report]:
    path = Path(path)
    try:
        docs = load_yaml_documents(path.read_text())
    except Exception as e:  # noqa: BLE001 - a YAML error is a finding, not a crash
        return [Report(str(path), "?", "?", errors=[f"cannot parse YAML: {e}"])]
    return [validate_document(doc, crds, f"{path}#{i}", path.parent) for i, doc in enumerate(docs)]


def manifest_files(paths: list[Path]) -> list[Path]:
    """Files named on the command line, plus *.yaml/*.yml found in named directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m k8s.validate", description=__doc__.split("\n")[0])
    ap.add_argument("--crds", type=Path, default=DEFAULT_CRD_DIR, help="directory of KubeRay CRD YAMLs")
    ap.add_argument("paths", nargs="+", type=Path, help="manifest files or directories")
    args = ap.parse_args(argv)
    crds = load_crds(str(args.crds)) if args.crds.is_dir() else None
    if crds is None:
        print(f"warning: no CRDs at {args.crds}; ray.io documents will fail", file=sys.stderr)
    failed = 0
    for path in manifest_files(args.paths):
        for r in validate_file(path, crds):
            print(f"{'OK  ' if r.ok else 'FAIL'} {r.source} {r.kind}/{r.name}")
            for w in r.warnings:
                print(f"     warning: {w}")
            for e in r.errors:
                print(f"     error: {e}")
            failed += not r.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
