"""The ``kubernetes`` backend: the rendered Job (and Service) through the official client.

``submit`` creates every document of the rendered file in its namespace
(Services first), ``status`` reads the Jobs' status and their pods, ``stop``
deletes the Jobs and Services with background propagation (their pods go
too), ``logs`` reads each pod's log, ``watch`` follows Job events.

Needs ``pip install 'hotwire[k8s]'`` (kubernetes==37.0.2) and a kubeconfig
(``--kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``), or in-cluster
credentials. Tested against a stand-in HTTP server only; see docs/jobs.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotwire.jobs.backends.base import Backend, BackendError, JobStatus, ReplicaStatus
from hotwire.jobs.errors import BackendUnavailable, JobNotFound
from hotwire.jobs.render import JOB_LABEL, RenderedJob


def _kubeconfig_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0]
    p = Path.home() / ".kube" / "config"
    return str(p) if p.exists() else None


class KubernetesBackend(Backend):
    name = "kubernetes"

    def __init__(
        self,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str = "default",
        api_client: Any = None,
    ) -> None:
        from kubernetes import client, config

        self.namespace = namespace
        if api_client is None:
            path = _kubeconfig_path(kubeconfig)
            try:
                if path:
                    api_client = config.new_client_from_config(config_file=path, context=context)
                else:
                    config.load_incluster_config()
                    api_client = client.ApiClient()
            except (config.ConfigException, OSError) as e:
                raise BackendUnavailable(
                    f"backend 'kubernetes' has no usable configuration: {e}; pass --kubeconfig "
                    "or set KUBECONFIG"
                ) from None
        self.api = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            return (
                "the kubernetes client is not installed: pip install 'hotwire[k8s]' "
                "(kubernetes==37.0.2)"
            )
        if not _kubeconfig_path(None) and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return (
                "no kubeconfig (~/.kube/config or $KUBECONFIG) and not inside a cluster; "
                "pass --kubeconfig FILE"
            )
        return None

    def _api_error(self, what: str, e: Exception) -> BackendError:
        status = getattr(e, "status", None)
        reason = getattr(e, "reason", None) or str(e)
        return BackendError(f"kubernetes {what} failed: {status or ''} {reason}".strip())

    def submit(self, job: RenderedJob) -> JobStatus:
        from kubernetes.client.exceptions import ApiException

        docs = sorted(job.documents, key=lambda d: d["kind"] != "Service")
        for d in docs:
            ns = d["metadata"].get("namespace", self.namespace)
            try:
                if d["kind"] == "Service":
                    self.core.create_namespaced_service(ns, d)
                elif d["kind"] == "Job":
                    self.batch.create_namespaced_job(ns, d)
                else:
                    raise BackendError(f"cannot create a {d['kind']} (only Job and Service)")
            except ApiException as e:
                if e.status == 409:
                    raise BackendError(
                        f"kubernetes {d['kind']} {d['metadata']['name']} already "
                        f"exists in namespace {ns}; stop it first"
                    ) from None
                raise self._api_error(f"create {d['kind']} {d['metadata']['name']}", e) from None
        self.namespace = job.request.namespace
        return self.status(job.name)

    def _jobs(self, name: str) -> list[Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            res = self.batch.list_namespaced_job(
                self.namespace, label_selector=f"{JOB_LABEL}={name}"
            )
        except ApiException as e:
            raise self._api_error("list jobs", e) from None
        if not res.items:
            raise JobNotFound(f"no kubernetes job {name!r} in namespace {self.namespace}")
        return list(res.items)

    def status(self, name: str) -> JobStatus:
        jobs = self._jobs(name)
        reps: list[ReplicaStatus] = []
        state, message = "running", ""
        main_done = True
        for j in jobs:
            st = j.status
            conds = {c.type: c for c in (st.conditions or []) if c.status == "True"}
            n = j.spec.completions or 1
            daemon = (j.metadata.annotations or {}).get("hotwire.io/daemon") == "true"
            if "Failed" in conds:
                state, message = "failed", conds["Failed"].message or conds["Failed"].reason or ""
            elif "Complete" not in conds and not daemon:
                main_done = False
            done_idx = _indexes(st.completed_indexes)
            for i in range(n):
                rstate = (
                    "succeeded"
                    if i in done_idx
                    else "failed"
                    if "Failed" in conds
                    else "running"
                    if (st.active or 0)
                    else "pending"
                )
                reps.append(ReplicaStatus(f"{j.metadata.name}-{i}", rstate))
        if state != "failed" and main_done:
            state = "succeeded"
        elif state != "failed" and all(r.state == "pending" for r in reps):
            state = "pending"
        return JobStatus(name, self.name, state, tuple(reps), message)

    def list(self) -> list[JobStatus]:
        res = self.batch.list_namespaced_job(
            self.namespace, label_selector="app.kubernetes.io/managed-by=hotwire"
        )
        names = sorted({(j.metadata.labels or {}).get(JOB_LABEL) for j in res.items} - {None})
        return [self.status(n) for n in names]

    def stop(self, name: str) -> JobStatus:
        from kubernetes.client import V1DeleteOptions
        from kubernetes.client.exceptions import ApiException

        final = self.status(name)
        opts = V1DeleteOptions(propagation_policy="Background")
        try:
            for j in self._jobs(name):
                self.batch.delete_namespaced_job(j.metadata.name, self.namespace, body=opts)
            svcs = self.core.list_namespaced_service(
                self.namespace, label_selector=f"{JOB_LABEL}={name}"
            )
            for s in svcs.items:
                self.core.delete_namespaced_service(s.metadata.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise self._api_error(f"delete job {name}", e) from None
        if final.done:
            return final
        return JobStatus(name, self.name, "stopped", final.replicas, "deleted on request")

    def delete(self, name: str) -> None:
        try:
            self.stop(name)
        except JobNotFound:
            pass

    def logs(self, name: str) -> dict[str, str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={name}")
        return {
            p.metadata.name: self.core.read_namespaced_pod_log(p.metadata.name, self.namespace)
            for p in pods.items
        }

    def watch(self, name: str, timeout: float = 60) -> Iterator[JobStatus]:
        """Each change of the job's status, from a watch on its Jobs, until done or timeout."""
        from kubernetes import watch

        w = watch.Watch()
        for _ in w.stream(
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=f"{JOB_LABEL}={name}",
            timeout_seconds=int(timeout),
        ):
            st = self.status(name)
            yield st
            if st.done:
                w.stop()
                return


def _indexes(text: str | None) -> set[int]:
    """Kubernetes' ``completedIndexes`` ("1,3-5,7") as a set."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
