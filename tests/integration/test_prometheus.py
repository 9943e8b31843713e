"""A real Prometheus scrapes a running graphserve app; then every dashboard query returns data.

Scenario (self-contained; it shares no Ray instance with other tests):
1. Prometheus (Debian's package, installed by .ci/install-prometheus.sh) starts on 127.0.0.1 with a
   throw-away data dir and one static target, Ray's metrics endpoint, scraped every second. The
   target carries `ray_io_cluster=<CLUSTER>`, as KubeRay's PodMonitor relabeling would add.
2. A driver subprocess (this file run as a script) starts its own local Ray with
   `_metrics_export_port` and a 1 s metrics report interval, runs the app from deployments/app.yaml
   (application "graphserve", random:tiny on CPU, smaller buckets for speed) on a free HTTP port,
   and sends mixed traffic: single prompts, prompt batches (padded buckets), concurrent and
   streamed requests.
3. Every PromQL expression of deployments/dashboard.py, with Grafana's variables set the way a user
   would (cluster regex, application "graphserve"), is run as a range query over the traffic
   window and must return at least one finite value; the template variables must find the app.
Skips without the prometheus binary, except under CI=true. Takes about a minute.
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "graphserve-it-abcde"                 # what ray_io_cluster holds on Kubernetes
APP_OVERRIDES = {"max_seq_len": 256, "batch_buckets": [1, 2, 4, 8]}
MARK = "@@driver "                             # prefix of the driver's protocol lines on stdout
TRAFFIC_SECONDS = 12.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60.0) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


# ----------------------------------------------------------------------------------------------
# The driver: runs in its own process (python tests/integration/test_prometheus.py --driver ...).
def _traffic(base: str, model: str, seconds: float) -> int:
    """Mixed load for `seconds` from 3 threads; returns the number of requests that succeeded."""
    shapes = [{"prompt": "Hello"}, {"prompt": ["a b c", "d e", "f"]},       # bucket 1; bucket 4 (padded)
              {"prompt": ["x"] * 6}, {"prompt": "stream me", "stream": True}]
    done, stop = [], time.monotonic() + seconds

    def worker(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            body = {"model": model, "max_tokens": 6, "temperature": 0.0, **shapes[i % len(shapes)]}
            _http(f"{base}/v1/completions", body)
            done.append(1)
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done)


def driver_main(metrics_port: int, serve_port: int) -> None:
    sys.path.insert(0, str(ROOT))
    import ray
    import yaml
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    app = yaml.safe_load((ROOT / "deployments" / "app.yaml").read_text())["applications"][0]
    args = AppArgs.model_validate({**app["args"], **APP_OVERRIDES})
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    serve.run(build_app(args), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    print(f"{MARK}ready", flush=True)
    n = _traffic(f"http://127.0.0.1:{serve_port}", args.model, TRAFFIC_SECONDS)
    time.sleep(3.0)                                       # > one report interval + one scrape
    print(f"{MARK}traffic {n}", flush=True)
    sys.stdin.readline()                                  # the test says when it has queried
    serve.shutdown()
    ray.shutdown()


# ----------------------------------------------------------------------------------------------
# The test side.
class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "ray", "static_configs": [
                      {"targets": [target], "labels": {"ray_io_cluster": CLUSTER}}]}]}
        (workdir / "prometheus.yml").write_text(json.dumps(config))   # JSON is YAML
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.log.name}")
            try:
                _http(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("prometheus did not become ready")

    def api(self, path: str, **params) -> dict:
        raw = _http(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        answer = json.loads(raw)
        assert answer["status"] == "success", answer
        return answer["data"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Driver:
    def __init__(self, workdir: Path, metrics_port: int, serve_port: int):
        env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", "PYTHONUNBUFFERED": "1"}
        self.log_path = workdir / "driver.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--driver", str(metrics_port), str(serve_port)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.lines.put(line[len(MARK):].strip())

    def expect(self, word: str, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = self.log_path.read_text()[-3000:]
            raise AssertionError(f"driver did not say {word!r} in {timeout:.0f} s; log tail:\n{tail}")
        assert line.startswith(word), line
        return line

    def stop(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus binary missing: .ci/install-prometheus.sh should have installed it")
        pytest.skip("prometheus not installed (run: bash .ci/install-prometheus.sh)")
    workdir = tmp_path_factory.mktemp("prometheus")
    metrics_port, serve_port = _free_port(), _free_port()
    prom = Prometheus(binary, workdir, f"127.0.0.1:{metrics_port}")
    driver = Driver(workdir, metrics_port, serve_port)
    try:
        driver.expect("ready", timeout=240)
        start = time.time()
        sent = int(driver.expect("traffic", timeout=120).split()[1])
        assert sent > 10, f"only {sent} requests succeeded"
        targets = prom.api("targets")["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
        yield prom, start - 5, time.time()
    finally:
        driver.stop()
        prom.stop()


def _finite(series: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for s in series for _, v in s["values"])


@pytest.mark.timeout(420)
def test_every_dashboard_query_returns_data(scraped):
    from deployments import dashboard

    prom, start, end = scraped
    empty = []
    for title, expr in dashboard.expressions(dashboard.build_dashboard()):
        query = dashboard.instantiate(expr, cluster="graphserve-.*", application="graphserve",
                                      rate_interval="10s")
        result = prom.api("query_range", query=query, start=start, end=end, step=1)["result"]
        if not _finite(result):
            empty.append(f"{title}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


@pytest.mark.timeout(60)
def test_dashboard_variables_find_the_app(scraped):
    from deployments import dashboard

    prom, start, end = scraped
    for var in dashboard.variables()[1:]:
        metric, label = var["definition"][len("label_values("):-1].rsplit(", ", 1)
        values = prom.api(f"label/{label}/values", **{"match[]": dashboard.instantiate(metric)},
                          start=start, end=end)
        assert values, f"variable {var['name']}: no values for {var['definition']}"
        assert {"cluster": CLUSTER, "application": "graphserve"}[var["name"]] in values


@pytest.mark.timeout(60)
def test_replica_gauges_are_still_live_after_traffic(scraped):
    """Per-replica state gauges must be re-set periodically: Ray drops a gauge series that is not
    refreshed within two report intervals, and a panel would go blank minutes after startup."""
    from router import metrics as catalog

    prom, _, _ = scraped
    time.sleep(4.0)                                       # well past 2 x the 1 s report interval
    stale = [spec.exported_name for spec in catalog.CATALOG if spec.kind == "gauge"
             if not prom.api("query", query=f'{spec.exported_name}{{application="graphserve"}}')["result"]]
    assert not stale, f"gauges no longer exported: {stale}"


if __name__ == "__main__" and sys.argv[1:2] == ["--driver"]:
    driver_main(int(sys.argv[2]), int(sys.argv[3]))
