"""Push graphserve's dashboard to a Grafana instance through its HTTP API (grafana-client).

Usage: python -m deployments.grafana_push --url URL --token TOKEN [--folder-uid UID] [--message TEXT]
                                          [--file dashboard.json] [--dry-run]
       URL and TOKEN default to the environment variables GRAFANA_URL and GRAFANA_TOKEN.

Contract: exactly one request, Grafana's create-or-update call
    POST {URL}/api/dashboards/db
    Authorization: Bearer {TOKEN}          (a service-account token; user:pass@ in the URL also works)
    {"dashboard": {..., "id": null, "uid": "graphserve"}, "overwrite": true,
     "folderUid": UID (only with --folder-uid), "message": TEXT}
`id: null` plus the fixed uid makes it an upsert keyed by uid, so pushing twice updates in place.
A URL with a sub-path (https://host/grafana) keeps the sub-path. Exit status: 0 on success,
1 when Grafana answers with an error or cannot be reached, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Optional
from urllib.parse import urlparse, urlunparse

from deployments import dashboard as dashboard_mod

DEFAULT_MESSAGE = "graphserve: pushed by deployments.grafana_push"


def build_payload(dashboard: dict, folder_uid: Optional[str] = None,
                  message: str = DEFAULT_MESSAGE) -> dict:
    """The JSON body of POST /api/dashboards/db."""
    body: dict[str, Any] = {"dashboard": {**dashboard, "id": None}, "overwrite": True, "message": message}
    if folder_uid:
        body["folderUid"] = folder_uid
    return body


def normalize_url(url: str) -> str:
    """Give a sub-path a trailing slash: grafana-client appends `api` to the path as is."""
    parts = urlparse(url)
    path = parts.path if parts.path.endswith("/") or not parts.path else parts.path + "/"
    return urlunparse(parts._replace(path=path))


def push(url: str, token: Optional[str], payload: dict, timeout: float = 10.0) -> Any:
    """Send the payload; returns Grafana's JSON answer or raises grafana_client's exceptions."""
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url=normalize_url(url), credential=token or None, timeout=timeout)
    return api.dashboard.update_dashboard(payload)


def _parse(argv: Optional[list[str]], env: Mapping[str, str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deployments.grafana_push",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=env.get("GRAFANA_URL"), help="Grafana base URL (env GRAFANA_URL)")
    ap.add_argument("--token", default=env.get("GRAFANA_TOKEN"),
                    help="service-account token (env GRAFANA_TOKEN)")
    ap.add_argument("--folder-uid", help="folder to put the dashboard in (default: General)")
    ap.add_argument("--message", default=DEFAULT_MESSAGE, help="version-history message")
    ap.add_argument("--file", help="push this dashboard JSON instead of generating it")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the request body, send nothing")
    args = ap.parse_args(argv)
    if not args.dry_run:
        if not args.url:
            ap.error("no Grafana URL: pass --url or set GRAFANA_URL")
        if not args.token and not urlparse(args.url).password:
            ap.error("no credential: pass --token, set GRAFANA_TOKEN, or put user:password@ in the URL")
    return args


def main(argv: Optional[list[str]] = None, env: Mapping[str, str] = os.environ) -> int:
    args = _parse(argv, env)
    if args.file:
        with open(args.file) as f:
            dash = json.load(f)
    else:
        dash = dashboard_mod.build_dashboard()
    payload = build_payload(dash, args.folder_uid, args.message)
    if args.dry_run:
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    from grafana_client.client import GrafanaException

    try:
        answer = push(args.url, args.token, payload, args.timeout)
    except GrafanaException as e:
        print(f"error: Grafana answered {e.status_code}: {e.message}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - connection errors come from niquests; report, don't trace
        print(f"error: cannot push to {args.url}: {e}", file=sys.stderr)
        return 1
    answer = answer if isinstance(answer, dict) else {}
    print(f"pushed dashboard uid={answer.get('uid', dash.get('uid'))} version={answer.get('version')} "
          f"url={answer.get('url', '?')} status={answer.get('status', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
