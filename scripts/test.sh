#!/usr/bin/env bash
# The whole test suite, with all set-up on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --full
exec .venv/bin/python -m pytest -q "$@"
