#!/usr/bin/env bash
# Build hotwire's container image: the wheels of hotwire and its dependencies first
# (pip, with this machine's network and certificates), then the image from them
# with no network (Containerfile).
#   bash scripts/build-image.sh [TAG] [BASE]
# TAG defaults to localhost/hotwire:latest; BASE to the Containerfile's (python:3.11-slim).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/hotwire:latest}
base=${2:-}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
"$py" -m pip wheel -q --disable-pip-version-check -w "$ctx/wheels" .
cp Containerfile "$ctx/"
args=(--format docker -t "$tag")
[ -n "$base" ] && args+=(--build-arg "BASE=$base")
podman build "${args[@]}" "$ctx"
