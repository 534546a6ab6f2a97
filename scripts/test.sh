#!/usr/bin/env bash
# The test suite, with all set-up on a fresh machine: virtualenv, dependencies, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
