"""`python -m deployments.grafana_push` against a local stand-in for Grafana's HTTP API.

No Grafana server can be installed in CI, so a `http.server` on 127.0.0.1 records what grafana-client
sends and answers like Grafana's POST /api/dashboards/db does. The checks are on the wire: method,
path (sub-path kept), auth header, content type and the JSON body.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments import dashboard, grafana_push


class _StandIn(BaseHTTPRequestHandler):
    status = 200
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                              "body": json.loads(body)})
        if self.status == 200:
            answer = {"id": 7, "uid": "graphserve", "url": "/d/graphserve/graphserve", "status": "success",
                      "version": 3, "slug": "graphserve"}
        else:
            answer = {"message": "invalid API key"}
        data = json.dumps(answer).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def grafana(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    handler = type("Handler", (_StandIn,), {"requests": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_sends_create_or_update_request(grafana, capsys):
    handler, url = grafana
    rc = grafana_push.main(["--url", url, "--token", "glsa_test", "--folder-uid", "ray", "--message", "m"],
                           env={})
    assert rc == 0
    (req,) = handler.requests
    assert req["method"] == "POST" and req["path"] == "/api/dashboards/db"
    assert req["headers"]["Authorization"] == "Bearer glsa_test"
    assert req["headers"]["Content-Type"].startswith("application/json")
    body = req["body"]
    assert set(body) == {"dashboard", "overwrite", "folderUid", "message"}
    assert body["overwrite"] is True and body["folderUid"] == "ray" and body["message"] == "m"
    expected = dashboard.build_dashboard()
    assert body["dashboard"]["id"] is None
    assert {k: v for k, v in body["dashboard"].items() if k != "id"} == expected
    assert "uid=graphserve version=3" in capsys.readouterr().out


def test_url_and_token_from_env_and_subpath_kept(grafana):
    handler, url = grafana
    rc = grafana_push.main([], env={"GRAFANA_URL": url + "/grafana", "GRAFANA_TOKEN": "from-env"})
    assert rc == 0
    (req,) = handler.requests
    assert req["path"] == "/grafana/api/dashboards/db"
    assert req["headers"]["Authorization"] == "Bearer from-env"
    assert "folderUid" not in req["body"]        # General folder


def test_flags_override_env(grafana):
    handler, url = grafana
    assert grafana_push.main(["--url", url, "--token", "flag"], env={"GRAFANA_URL": "http://nowhere:1",
                                                                     "GRAFANA_TOKEN": "env"}) == 0
    assert handler.requests[0]["headers"]["Authorization"] == "Bearer flag"


def test_basic_auth_in_url(grafana):
    handler, url = grafana
    assert grafana_push.main(["--url", url.replace("http://", "http://admin:secret@")], env={}) == 0
    assert handler.requests[0]["headers"]["Authorization"].startswith("Basic ")


def test_pushes_a_given_file(grafana, tmp_path):
    handler, url = grafana
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"uid": "x", "title": "X", "panels": [], "id": 5}))
    assert grafana_push.main(["--url", url, "--token", "t", "--file", str(path)], env={}) == 0
    assert handler.requests[0]["body"]["dashboard"] == {"uid": "x", "title": "X", "panels": [], "id": None}


def test_grafana_error_exits_1(grafana, capsys):
    handler, url = grafana
    handler.status = 401
    assert grafana_push.main(["--url", url, "--token", "bad"], env={}) == 1
    assert "401" in capsys.readouterr().err


def test_unreachable_exits_1(capsys):
    assert grafana_push.main(["--url", "http://127.0.0.1:9", "--token", "t", "--timeout", "2"], env={}) == 1
    assert "cannot push" in capsys.readouterr().err


def test_missing_url_or_token_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        grafana_push.main(["--token", "t"], env={})
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        grafana_push.main(["--url", "http://127.0.0.1:1"], env={})
    assert e.value.code == 2


def test_dry_run_prints_payload_without_sending(capsys):
    assert grafana_push.main(["--dry-run"], env={}) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["dashboard"]["uid"] == dashboard.UID and body["overwrite"] is True
