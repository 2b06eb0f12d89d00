#!/usr/bin/env bash
# Makes sure Debian's `prometheus` package (prometheus and promtool) is installed, for the dashboards test
# (tests/integration/test_dashboards_prometheus.py runs it; CI may run it beforehand).  Prints the directory
# holding both binaries.  Exits non-zero, saying why, when they are missing and cannot be installed.
#
# The package starts its own service on install (systemd, or the init script where there is no systemd),
# listening on :9090.  The tests run their own Prometheus on a port and data directory of their own, so the
# packaged service is kept from starting (policy-rc.d during the install), and stopped and disabled if it
# runs anyway: nothing of ours is left listening on 9090.
set -euo pipefail

have() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

stop_packaged_service() {
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    command -v update-rc.d >/dev/null 2>&1 && update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
}

if ! have; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "prometheus is not installed and this is not root: run 'apt-get install -y prometheus' as root" >&2
    exit 1
  fi
  echo "installing Debian's prometheus package" >&2
  # Keep the package's service from starting at all: invoke-rc.d asks policy-rc.d (101: action forbidden).
  policy=/usr/sbin/policy-rc.d
  restore=""
  if [ -e "$policy" ]; then
    restore="$(mktemp)"
    cp -p "$policy" "$restore"
  fi
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  trap 'if [ -n "$restore" ]; then mv "$restore" "$policy"; else rm -f "$policy"; fi' EXIT
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends prometheus >&2; then
    apt-get update >&2 || true
    apt-get install -y --no-install-recommends prometheus >&2
  fi
  stop_packaged_service
fi

if ! have; then
  echo "prometheus/promtool still not found after installing the package" >&2
  exit 1
fi
dirname "$(command -v prometheus)"
