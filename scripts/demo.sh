#!/usr/bin/env bash
# The main job: a local cluster (master + 2 workers) runs examples/wordcount.py,
# then upgrades it online to examples/wordcount_v2.py while words keep flowing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HOTWIRE_MASTER=${HOTWIRE_MASTER:-127.0.0.1:7600}
CTL=".venv/bin/streamctl"

echo "== starting a local cluster with examples/wordcount.py"
.venv/bin/streamctl up examples/wordcount.py --workers 2 --listen "$HOTWIRE_MASTER" &
UP=$!
trap 'kill -TERM $UP 2>/dev/null || true; wait $UP 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
  if $CTL status wordcount >/dev/null 2>&1; then break; fi
  sleep 0.2
done
sleep 4
echo "== streamctl status"
$CTL status wordcount
echo "== streamctl upgrade examples/wordcount_v2.py (online: the cluster keeps running)"
$CTL upgrade examples/wordcount_v2.py
sleep 4
echo "== streamctl history wordcount"
$CTL history wordcount
echo "== streamctl status"
$CTL status wordcount
echo "== stopping the cluster"
