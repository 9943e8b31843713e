#!/usr/bin/env bash
# Install a Prometheus server binary for tests/integration/test_prometheus.py (Debian's package).
# The test starts its own server on 127.0.0.1 with a throw-away config and data dir, so the packaged
# system service is not wanted: no Recommends (node-exporter), and where systemd runs, the service the
# package enables is stopped and disabled so it does not keep 0.0.0.0:9090 (in containers Debian's
# policy-rc.d already stops it from starting). Idempotent: does nothing if `prometheus` is on PATH.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends prometheus
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus.service || true
fi
prometheus --version | head -n 1
