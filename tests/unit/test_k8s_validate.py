"""k8s.validate: every committed manifest passes, strictly; every planted mistake is caught.

The KubeRay CRDs are read from ../shared/kuberay/crds (next to the repository). Without them the
tests skip, except under CI=true, where a missing copy is a failure.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from k8s import crd_schema, validate
from k8s.crd_schema import load_yaml_documents

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT.parent / "shared" / "kuberay" / "crds"
DATA = ROOT / "tests" / "data" / "k8s"


@pytest.fixture(scope="module")
def crds():
    if not CRD_DIR.is_dir():
        msg = f"KubeRay CRDs not found at {CRD_DIR} (see shared/kuberay/SOURCE.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return crd_schema.load_crds(str(CRD_DIR))


@pytest.fixture
def good(crds):
    """The committed RayService, parsed (a fresh copy per test, for mutation)."""
    (doc,) = load_yaml_documents((ROOT / "k8s" / "rayservice.yaml").read_text())
    return doc


def _errors(doc, crds) -> list[str]:
    return validate.validate_document(doc, crds).errors


@pytest.mark.parametrize("path", sorted((ROOT / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_manifests_validate_without_warnings(path, crds):
    reports = validate.validate_file(path, crds)
    assert reports
    for r in reports:
        assert r.errors == [] and r.warnings == [], f"{r.source}: {r.errors + r.warnings}"


BAD_RAYSERVICE_FAULTS = [
    "/metadata/name: 'graphserve-with-a-name-that-is-far-too-long-for-kuberay' must be a DNS-1035",
    "/spec/upgradeStrategy/type: 'BlueGreen' is not one of",
    "/spec/serveConfigV2/applications/0/route_prefx: unknown field",
    "/spec/serveConfigV2/applications/0/deployments/0/num_replicas",
    "graphserve/LLMReplica asks for 2 GPUs per replica",
    "'enableInTreeAutoScaling' was unexpected",
    "rayStartParams/num-gpus: 0 is not of type 'string'",
    "rayStartParams/labels: not allowed",
    "image: Ray 2.59.0 but rayVersion is 2.60.0",
    "none named 'serve'",
    "limits/memory: '32GB' does not match",
    "nvidia.com/gpu is requested but not limited",
]


def test_broken_rayservice_is_rejected_for_every_fault(crds):
    (report,) = validate.validate_file(DATA / "bad-rayservice.yaml", crds)
    assert not report.ok
    for fault in BAD_RAYSERVICE_FAULTS:
        assert any(fault in e for e in report.errors), f"not reported: {fault}\n" + "\n".join(report.errors)
    # The null is pruned (a warning), and the defaulted minReplicas/maxReplicas are not "missing".
    assert report.warnings == ["/spec/rayClusterConfig/workerGroupSpecs/0/idleTimeoutSeconds: null value "
                               "dropped (the apiserver prunes it)"]
    assert not any("required property" in e for e in report.errors)


def test_broken_monitoring_manifests_are_rejected(crds):
    reports = validate.validate_file(DATA / "bad-monitoring.yaml", crds)
    assert [r.kind for r in reports] == ["PodMonitor", "PodMonitor", "ConfigMap"]
    joined = ["\n".join(r.errors) for r in reports]
    assert "/spec/podMetricsEndpoint: unknown field" in joined[0] and "empty selector" in joined[0]
    assert "port name" in joined[1] or "*name*" in joined[1]
    assert "'rename' is not a relabel action" in joined[1]
    assert "grafana_dashboard: value 1 must be a string" in joined[2] and "not valid JSON" in joined[2]


def test_v1alpha1_is_rejected(crds):
    (report,) = validate.validate_file(DATA / "bad-v1alpha1.yaml", crds)
    assert report.errors == ["/apiVersion: ray.io/v1alpha1 is deprecated; use ray.io/v1"]


def test_unknown_kind_and_unparseable_yaml_fail(crds, tmp_path):
    assert "no schema for 'Deployment'" in _errors({"apiVersion": "apps/v1", "kind": "Deployment"}, crds)[0]
    bad = tmp_path / "x.yaml"
    bad.write_text("a: [1, 2\n")
    (report,) = validate.validate_file(bad, crds)
    assert "cannot parse YAML" in report.errors[0]


def test_required_fields_are_checked_after_defaults(good, crds):
    group = good["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]          # both required *and* defaulted in the CRD
    assert _errors(good, crds) == []
    del group["groupName"]                                   # required, no default
    assert any("'groupName' is a required property" in e for e in _errors(good, crds))


def test_unknown_fields_are_rejected_at_any_depth(good, crds):
    container = good["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")      # typo, deep inside a pod template
    assert any("'resource' was unexpected" in e for e in _errors(good, crds))


def test_serve_port_must_match_the_head_serve_port(good, crds):
    good["spec"]["serveConfigV2"] = good["spec"]["serveConfigV2"].replace("port: 8000", "port: 9000")
    assert any("Serve listens on 9000 but the head port 'serve' is 8000" in e for e in _errors(good, crds))


def test_gpu_limits_must_equal_requests(good, crds):
    res = good["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    res["resources"]["requests"]["nvidia.com/gpu"] = "2"
    assert any("nvidia.com/gpu limits (1) != requests (2)" in e for e in _errors(good, crds))


def test_resources_set_twice_and_incremental_upgrade_needs_options(good, crds):
    doc = copy.deepcopy(good)
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["resources"] = {"CPU": "0"}
    assert any("set in rayStartParams and a `resources:` map" in e for e in _errors(doc, crds))
    good["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade"}
    errors = _errors(good, crds)
    assert any("clusterUpgradeOptions: missing" in e for e in errors)
    assert any("incremental upgrades need autoscaling" in e for e in errors)


def test_deprecated_thresholds_warn(good, crds):
    good["spec"]["serviceUnhealthySecondThreshold"] = 900
    report = validate.validate_document(good, crds)
    assert report.ok and any("deprecated" in w for w in report.warnings)


def test_strict_skips_preserve_unknown_fields_nodes():
    schema = {"type": "object", "properties": {
        "free": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "maybe": {"type": "string", "nullable": True}}}
    s = crd_schema.strict(schema)
    assert s["additionalProperties"] is False and s["properties"]["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["maybe"]["type"] == ["string", "null"]
    doc, warnings = crd_schema.normalize({"maybe": None, "closed": None}, s)
    assert doc == {"maybe": None} and len(warnings) == 1


def test_cli_exit_status(crds, capsys):
    assert validate.main(["--crds", str(CRD_DIR), str(ROOT / "k8s")]) == 0
    assert validate.main(["--crds", str(CRD_DIR), str(DATA / "bad-rayservice.yaml")]) == 1
    out = capsys.readouterr().out
    assert "OK   " in out and "FAIL " in out


def test_pvc_and_kustomization_mistakes_are_caught(crds, tmp_path):
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
           "spec": {"accessModes": ["ReadOnly"], "resources": {"requests": {"storage": "100GB"}},
                    "storageClass": "fast"}}
    errors = _errors(pvc, crds)
    assert any("accessModes" in e for e in errors) and any("storage" in e for e in errors)
    assert any("storageClass" in e for e in errors)
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "images": [{"name": "graphserve", "newTag": "0.1.0"}]}
    assert any("has no registry" in e for e in _errors(kust, crds))
