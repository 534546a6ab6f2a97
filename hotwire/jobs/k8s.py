"""Checks of rendered manifests against Kubernetes, offline.

Two independent checks, both without a cluster:

* :func:`validate_schema`: the OpenAPI JSON schema of a pinned Kubernetes
  version, strict (unknown fields are errors), via ``kubernetes-validate``'s
  bundled schemas.
* :func:`to_models`: the official ``kubernetes`` client's models accept each
  document, and serialising them back gives the same document (so no field was
  silently dropped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from hotwire.jobs.errors import BackendUnavailable

# The Kubernetes version the rendered manifests are validated against.
KUBERNETES_VERSION = "1.33.0"

_MODEL_NAMES = {
    ("batch/v1", "Job"): "V1Job",
    ("v1", "Service"): "V1Service",
    ("v1", "Pod"): "V1Pod",
    ("v1", "ConfigMap"): "V1ConfigMap",
}


def validate_schema(
    documents: Iterable[dict[str, Any]], version: str = KUBERNETES_VERSION, strict: bool = True
) -> list[str]:
    """Problems of each document under the schema of Kubernetes ``version`` (empty: valid)."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError:
        raise BackendUnavailable(
            "schema validation needs kubernetes-validate: pip install kubernetes-validate==1.37.0"
        ) from None
    problems = []
    for d in documents:
        what = f"{d.get('kind', '?')}/{(d.get('metadata') or {}).get('name', '?')}"
        try:
            kubernetes_validate.validate(d, version, strict=strict)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            problems.append(f"{what}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problems.append(f"{what}: {e.message}")
        except KeyError as e:
            problems.append(f"{what}: lacks {e}")
    return problems


def to_models(documents: Iterable[dict[str, Any]]) -> list[Any]:
    """The ``kubernetes`` client model of each document; ``ValueError`` when one is not accepted."""
    try:
        from kubernetes.client import ApiClient
    except ImportError:
        raise BackendUnavailable(
            "the kubernetes client is not installed: pip install 'hotwire[k8s]' "
            "(kubernetes==37.0.2)"
        ) from None
    api = ApiClient()
    out = []
    for d in documents:
        key = (d.get("apiVersion"), d.get("kind"))
        model = _MODEL_NAMES.get(key)  # type: ignore[arg-type]
        if model is None:
            raise ValueError(f"no client model for apiVersion {key[0]} kind {key[1]}")
        name = (d.get("metadata") or {}).get("name")
        try:
            obj = api.deserialize(json.dumps(d), model, "application/json")
        except Exception as e:  # the client raises pydantic's ValidationError, TypeError, ...
            msg = " ".join(str(e).split())
            raise ValueError(
                f"{key[1]} {name}: the kubernetes client model rejects it: {msg}"
            ) from None
        back = api.sanitize_for_serialization(obj)
        if back != d:
            raise ValueError(
                f"{key[1]} {name}: the client model does not keep "
                f"the document as written: {_first_difference(d, back)}"
            )
        out.append(obj)
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in b:
                return f"{path}.{k} is dropped (unknown field?)"
            if k not in a:
                return f"{path}.{k} is added"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or '(root)'}: {a!r} != {b!r}"
