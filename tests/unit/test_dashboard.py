"""deployments.dashboard: names come from router/metrics.py, queries are well formed, layout is sane.

The live check (every expression returns data from a real Prometheus scraping a running app) is
tests/integration/test_prometheus.py; here the PromQL syntax is checked with `promtool` when it is
installed (.ci/install-prometheus.sh installs it; under CI=true its absence is a failure).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments import dashboard as d
from router import metrics as catalog

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket",)}


@pytest.fixture(scope="module")
def dash() -> dict:
    return d.build_dashboard()


def _names(dash: dict) -> set[str]:
    return {n for _, e in d.expressions(dash) for n in d.series_names(e)}


def test_every_catalog_metric_has_a_panel(dash):
    names = _names(dash)
    for spec in catalog.CATALOG:
        wanted = {spec.exported_name + s for s in SUFFIXES[spec.kind]}
        assert wanted & names, f"{spec.name} ({spec.kind}) is exported but not on the dashboard"


def test_every_series_comes_from_the_catalog_or_serve_builtins(dash):
    allowed = {spec.exported_name + s for spec in catalog.CATALOG for s in SUFFIXES[spec.kind]}
    allowed |= set(d.SERVE_BUILTINS) | {name + "_bucket" for name in d.SERVE_BUILTINS}
    assert _names(dash) - allowed == set()
    assert not [n for n in _names(dash) if n.startswith("ray_graphserve")
                and n.removesuffix("_bucket") not in {s.exported_name for s in catalog.CATALOG}]


def test_counters_are_rated_histograms_are_quantiled_gauges_are_not(dash):
    kinds = {s.exported_name: s.kind for s in catalog.CATALOG}
    for title, expr in d.expressions(dash):
        for name in d.series_names(expr):
            base = name.removesuffix("_bucket")
            kind = kinds.get(base, "histogram" if name.endswith("_bucket") else
                             "counter" if name.endswith("_total") else "gauge")
            under_rate = f"rate({name}{{" in expr
            if kind in ("counter", "histogram"):
                assert under_rate, f"{title}: {name} is a {kind}; query it through rate()"
            else:
                assert not under_rate, f"{title}: {name} is a gauge; rate() of it is meaningless"
            if kind == "histogram":
                assert expr.startswith("histogram_quantile(") and "by (le" in expr, title


def test_every_query_is_filtered_by_cluster_and_application(dash):
    for title, expr in d.expressions(dash):
        for name in d.series_names(expr):
            assert f'{name}{{ray_io_cluster=~"$cluster"' in expr, title
            if name != d.SERVE_ONGOING_HTTP:      # Serve labels that gauge by node only
                assert 'application=~"$application"' in expr, title


def test_datasource_is_a_variable_everywhere(dash):
    text = json.dumps(dash)
    assert '"uid": "${datasource}"' in text
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {"${datasource}"}
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "cluster", "application"]


def test_layout_is_a_non_overlapping_24_column_grid(dash):
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
    assert all(p.get("targets") for p in dash["panels"] if p["type"] != "row")


def test_json_is_deterministic_and_the_cli_writes_it(tmp_path):
    assert d.to_json() == d.to_json()
    out = tmp_path / "dash.json"
    assert d.main(["-o", str(out)]) == 0
    assert json.loads(out.read_text()) == d.build_dashboard()


def test_docs_show_the_current_layout():
    text = (ROOT / "docs" / "operations.md").read_text()
    assert d.ascii_layout() in text, "docs/operations.md: paste `python -m deployments.dashboard --ascii`"
    assert d.markdown_table() in text, "docs/operations.md: paste `python -m deployments.dashboard --markdown`"
    assert d.metrics_table() in text, "docs/operations.md: paste `python -m deployments.dashboard --metrics`"
    readme = (ROOT / "README.md").read_text()
    assert d.ascii_layout() in readme, "README.md: paste `python -m deployments.dashboard --ascii`"


def test_promql_syntax_with_promtool(dash, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool missing: .ci/install-prometheus.sh should have installed it")
        pytest.skip("promtool not installed (bash .ci/install-prometheus.sh)")
    rules = [{"record": f"graphserve:dashboard_check_{i}", "expr": d.instantiate(expr)}
             for i, (_, expr) in enumerate(d.expressions(dash))]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
