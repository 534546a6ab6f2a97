#!/usr/bin/env bash
# Create .venv and install hotwire with its test dependencies (idempotent).
# With --full it also installs what the deep-learning job tests use: PyTorch (CPU),
# the Kubernetes client and schema validator, and (as root, with apt) podman; and the
# servers the connector tests start for real: redis-server, nats-server, postgresql;
# ip and nft, which the multi-host tests use for network namespaces; debootstrap,
# which makes a base for the container image test when no registry answers;
# prometheus, which the metrics test starts itself (its service is left disabled); and
# chromium with its driver, in which the dashboard test opens the master's web page.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="test"
if [ "${1:-}" = "--full" ]; then
  extras="test,k8s,dl,bench,connectors"
  missing=""
  command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
  command -v nats-server >/dev/null 2>&1 || missing="$missing nats-server"
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"  # multi-host tests:
  command -v nft >/dev/null 2>&1 || missing="$missing nftables"  # network namespaces
  command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"  # an image base
  command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"  # the metrics test
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"  # the dashboard test's
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"  # browser
  if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing="$missing postgresql"
  fi
  if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing$missing (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "could not install$missing; the connector tests need them"
    case "$missing" in *prometheus*)  # the test runs its own; no server left listening
      if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
      fi ;;
    esac
  fi
  if ! command -v podman >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing podman, runc and busybox-static (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc busybox-static >/dev/null) \
      || echo "podman could not be installed; the podman backend tests will be skipped"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -c "import hotwire, grpc, msgpack, networkx"
