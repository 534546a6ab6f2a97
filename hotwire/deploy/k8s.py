"""Kubernetes manifests for a hotwire cluster, rendered by ``streamctl deploy k8s``.

One master and ``workers`` workers, in namespace ``namespace``:

- the master: a StatefulSet of one pod with a PersistentVolumeClaim for its store
  (``/var/lib/hotwire``: versions, checkpoints, tokens; the thing to back up), a
  Service ``hotwire-master`` on the gRPC port, readiness and liveness probes on
  the gRPC health service, and a ServiceAccount whose Role lets it create the
  Jobs and Services of deep-learning PEs (``--jobs-backend k8s``);
- the workers: a StatefulSet (stable names ``hotwire-worker-0``, ``-1``, ...,
  which are the worker names, so certificates can be issued for them) behind a
  headless Service, each advertising ``<pod>.hotwire-workers.<ns>.svc`` as its
  data-plane address; a PodDisruptionBudget lets one go at a time; a preStop
  hook sends SIGTERM and waits, and SIGTERM drains the worker (the master moves
  its instances to the others online) within ``terminationGracePeriodSeconds``;
- NetworkPolicies: the data port admits workers only; the master's port admits
  workers and pods labelled ``hotwire/client: "true"``; the health ports admit
  the kubelet's probes;
- every container runs as a non-root user with a read-only root filesystem, no
  privilege escalation, every capability dropped, and the runtime's seccomp
  profile; writable paths are volumes (the store, and an emptyDir for bundles
  and temporary files); requests and limits are set.

The manifests run the processes with ``--insecure``: plaintext, no tokens, with
the NetworkPolicies as the boundary. For mTLS, mount the CA and certificates
(``streamctl init`` and ``streamctl cert``) and drop ``--insecure``; see
docs/deploy.md.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

MASTER_PORT = 7600
DATA_PORT = 7700
HEALTH_PORT = 7701
STORE = "/var/lib/hotwire"

__all__ = ["DATA_PORT", "HEALTH_PORT", "MASTER_PORT", "manifests", "render"]


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "hotwire", "app.kubernetes.io/component": component}


def _security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _grpc_probe(port: int, period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": port}, "periodSeconds": period, "failureThreshold": failures}


def manifests(
    *,
    namespace: str = "hotwire",
    image: str = "hotwire:latest",
    workers: int = 2,
    slots: int = 16,
    storage: str = "1Gi",
    worker_cpu: str = "1",
    worker_memory: str = "2Gi",
    master_cpu: str = "500m",
    master_memory: str = "512Mi",
    heartbeat_timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """The objects of a cluster (module docstring), as dicts in apply order."""
    if not _DNS_LABEL.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} is not a DNS label (lower-case letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    ns = {"namespace": namespace}
    master_sel, worker_sel = _labels("master"), _labels("worker")
    master_addr = f"hotwire-master.{namespace}.svc:{MASTER_PORT}"
    tmp = {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}

    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "hotwire-master", **ns, "labels": master_sel},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "hotwire-jobs", **ns, "labels": master_sel},
            "rules": [
                {
                    "apiGroups": ["batch"],
                    "resources": ["jobs"],
                    "verbs": ["create", "get", "list", "watch", "delete"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["services"],
                    "verbs": ["create", "get", "list", "delete"],
                },
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "hotwire-jobs", **ns, "labels": master_sel},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "hotwire-jobs",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "hotwire-master", **ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "hotwire-master", **ns, "labels": master_sel},
            "spec": {
                "selector": master_sel,
                "ports": [{"name": "grpc", "port": MASTER_PORT, "targetPort": "grpc"}],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "hotwire-master", **ns, "labels": master_sel},
            "spec": {
                "serviceName": "hotwire-master",
                "replicas": 1,
                "selector": {"matchLabels": master_sel},
                "template": {
                    "metadata": {"labels": master_sel},
                    "spec": {
                        "serviceAccountName": "hotwire-master",
                        "securityContext": {"fsGroup": 10001},
                        "containers": [
                            {
                                "name": "master",
                                "image": image,
                                "args": [
                                    "master",
                                    "--listen",
                                    f"0.0.0.0:{MASTER_PORT}",
                                    "--data-dir",
                                    STORE,
                                    "--heartbeat-timeout",
                                    f"{heartbeat_timeout:g}",
                                    "--insecure",
                                ],
                                "ports": [{"name": "grpc", "containerPort": MASTER_PORT}],
                                "readinessProbe": _grpc_probe(MASTER_PORT, 5, 3),
                                "livenessProbe": _grpc_probe(MASTER_PORT, 10, 6),
                                "resources": {
                                    "requests": {"cpu": master_cpu, "memory": master_memory},
                                    "limits": {"memory": master_memory},
                                },
                                "securityContext": _security(),
                                "env": [{"name": "TMPDIR", "value": "/tmp"}],
                                "volumeMounts": [
                                    {"name": "store", "mountPath": STORE},
                                    {"name": "tmp", "mountPath": "/tmp"},
                                ],
                            }
                        ],
                        "volumes": [tmp],
                    },
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "store"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": storage}},
                        },
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "hotwire-workers", **ns, "labels": worker_sel},
            "spec": {
                "clusterIP": "None",  # headless: a DNS name per worker pod
                "publishNotReadyAddresses": True,
                "selector": worker_sel,
                "ports": [{"name": "data", "port": DATA_PORT, "targetPort": "data"}],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "hotwire-worker", **ns, "labels": worker_sel},
            "spec": {
                "serviceName": "hotwire-workers",
                "replicas": workers,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": worker_sel},
                "template": {
                    "metadata": {"labels": worker_sel},
                    "spec": {
                        "automountServiceAccountToken": False,
                        # the drain (SIGTERM) moves the worker's instances away first
                        "terminationGracePeriodSeconds": 120,
                        "containers": [
                            {
                                "name": "worker",
                                "image": image,
                                "args": [
                                    "--master",
                                    master_addr,
                                    "worker",
                                    "--name",
                                    "$(POD_NAME)",
                                    "--listen",
                                    f"0.0.0.0:{DATA_PORT}",
                                    "--advertise",
                                    f"$(POD_NAME).hotwire-workers.{namespace}.svc:{DATA_PORT}",
                                    "--health-port",
                                    str(HEALTH_PORT),
                                    "--slots",
                                    str(slots),
                                    "--data-dir",
                                    "/tmp/hotwire",
                                    "--insecure",
                                ],
                                "env": [
                                    {
                                        "name": "POD_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    },
                                    {"name": "TMPDIR", "value": "/tmp"},
                                ],
                                "ports": [
                                    {"name": "data", "containerPort": DATA_PORT},
                                    {"name": "health", "containerPort": HEALTH_PORT},
                                ],
                                "readinessProbe": _grpc_probe(HEALTH_PORT, 5, 3),
                                "livenessProbe": _grpc_probe(HEALTH_PORT, 10, 6),
                                "lifecycle": {
                                    "preStop": {
                                        "exec": {
                                            "command": [
                                                "/bin/sh",
                                                "-c",
                                                "kill -TERM 1; "
                                                "while kill -0 1 2>/dev/null; do sleep 1; done",
                                            ]
                                        }
                                    }
                                },
                                "resources": {
                                    "requests": {"cpu": worker_cpu, "memory": worker_memory},
                                    "limits": {"memory": worker_memory},
                                },
                                "securityContext": _security(),
                                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                            }
                        ],
                        "volumes": [tmp],
                    },
                },
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "hotwire-worker", **ns, "labels": worker_sel},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": worker_sel}},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "hotwire-data-plane", **ns, "labels": worker_sel},
            "spec": {
                "podSelector": {"matchLabels": worker_sel},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": worker_sel}}],
                        "ports": [{"protocol": "TCP", "port": DATA_PORT}],
                    },
                    {"ports": [{"protocol": "TCP", "port": HEALTH_PORT}]},
                ],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "hotwire-master", **ns, "labels": master_sel},
            "spec": {
                "podSelector": {"matchLabels": master_sel},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": worker_sel}},
                            {"podSelector": {"matchLabels": {"hotwire/client": "true"}}},
                        ],
                        "ports": [{"protocol": "TCP", "port": MASTER_PORT}],
                    }
                ],
            },
        },
    ]
    return objs


def render(**kwargs: Any) -> str:
    """:func:`manifests` as one multi-document YAML stream."""
    return yaml.safe_dump_all(manifests(**kwargs), sort_keys=False)
