"""Kubernetes manifests for graphserve and the tools that make and check them.

- `k8s.generate`   renders rayservice.yaml, podmonitors.yaml and the Grafana ConfigMap (CLI).
- `k8s.validate`   validates manifests offline against the KubeRay CRDs, strictly (CLI).
- `k8s.crd_schema` turns a CRD's openAPIV3Schema into a strict JSON Schema and mimics the
  apiserver's null pruning and defaulting.

The YAML files next to these modules are generated; edit the generator, not the output.
"""
