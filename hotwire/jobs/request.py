"""Job requests: what a user asks for, parsed and validated in one pass.

:func:`parse_request` turns a mapping (from YAML, JSON or Python) into a frozen
:class:`JobRequest`, or raises :class:`~hotwire.jobs.errors.RequestError` whose
``problems`` name every bad field, not just the first.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hotwire.jobs.errors import RequestError

BACKENDS = ("local", "podman", "kubernetes")
ACCELERATORS = ("cpu", "gpu")
# DNS-1123 label, the form Kubernetes needs for Job, Service and pod host names.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Job names leave room for "-<index>" pod host names and the "-ps"/"-worker" suffixes.
MAX_NAME_LEN = 48

_MEM_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_MEM_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?$")
_CPU_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m)?$")


def parse_cpu(value: Any) -> float:
    """Cores as a float from ``2``, ``0.5`` or a Kubernetes quantity such as ``"500m"``."""
    if isinstance(value, bool):
        raise ValueError("must be a number of cores such as 1, 0.5 or '500m'")
    if isinstance(value, int | float):
        cores = float(value)
    else:
        m = _CPU_RE.match(str(value).strip())
        if not m:
            raise ValueError(f"must be a number of cores such as 1, 0.5 or '500m', got {value!r}")
        cores = float(m.group(1)) / (1000 if m.group(2) else 1)
    if not math.isfinite(cores) or cores <= 0:
        raise ValueError(f"must be more than 0 cores, got {value!r}")
    return cores


def parse_memory(value: Any) -> int:
    """Bytes from an int or a Kubernetes quantity such as ``"512Mi"`` or ``"2G"``."""
    if isinstance(value, bool):
        raise ValueError("must be bytes or a quantity such as '512Mi'")
    if isinstance(value, int):
        n = value
    else:
        m = _MEM_RE.match(str(value).strip())
        if not m:
            raise ValueError(f"must be bytes or a quantity such as '512Mi' or '2Gi', got {value!r}")
        n = int(float(m.group(1)) * _MEM_UNITS[m.group(2) or ""])
    if n <= 0:
        raise ValueError(f"must be more than 0 bytes, got {value!r}")
    return n


def cpu_quantity(cores: float) -> str:
    """The Kubernetes form of ``cores``: ``"2"`` or ``"500m"``."""
    if float(cores).is_integer():
        return str(int(cores))
    return f"{round(cores * 1000)}m"


def memory_quantity(n: int) -> str:
    """The Kubernetes form of ``n`` bytes, in the largest binary unit that divides it."""
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if n % _MEM_UNITS[unit] == 0:
            return f"{n // _MEM_UNITS[unit]}{unit}"
    return str(n)


@dataclass(frozen=True)
class Resources:
    """Per-replica resources. ``cpu`` in cores, ``memory`` in bytes, ``gpu`` a count."""

    cpu: float | None = None
    memory: int | None = None
    gpu: int = 0


@dataclass(frozen=True)
class JobRequest:
    """A validated job request. Build one with :func:`parse_request`."""

    name: str
    framework: str
    mode: str = "single"
    version: str | None = None
    accelerator: str = "cpu"
    replicas: int = 1
    procs_per_replica: int = 1
    ps_replicas: int = 1
    resources: Resources = field(default_factory=Resources)
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    program: str | None = None
    data: str | None = None
    working_dir: str | None = None
    template: str | None = None
    image: str | None = None
    backend: str | None = None
    namespace: str = "default"
    timeout: float | None = None

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def to_dict(self) -> dict[str, Any]:
        """The request as plain data; ``parse_request(r.to_dict()) == r``."""
        d = asdict(self)
        d["command"] = list(self.command)
        d["args"] = list(self.args)
        d["env"] = dict(self.env)
        res = {k: v for k, v in d["resources"].items() if v not in (None, 0)}
        d["resources"] = res
        return {k: v for k, v in d.items() if v not in (None, [], {})}

    def replace(self, **changes: Any) -> JobRequest:
        """A new request with ``changes`` applied and validated again."""
        d = self.to_dict()
        d.update(changes)
        return parse_request(d)


@dataclass(frozen=True)
class CatalogNames:
    """The names the catalogs offer, so that :func:`parse_request` checks them too.

    ``modes`` maps every framework of a template or an image to the modes of its
    templates; ``templates`` and ``images`` are the catalog ids. With these, an unknown
    framework, mode, template or image is named together with every other bad field
    instead of failing later, alone, at selection.
    """

    modes: Mapping[str, frozenset[str]]
    templates: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()

    @classmethod
    def of(cls, templates: Iterable[Any], images: Iterable[Any]) -> CatalogNames:
        """From catalog entries: templates with ``id``, ``framework``, ``mode``; images with
        ``id`` and ``framework`` (``Catalog.templates.values()``, ``Catalog.images.values()``).
        """
        modes: dict[str, set[str]] = {}
        template_ids: set[str] = set()
        image_ids: set[str] = set()
        for t in templates:
            modes.setdefault(t.framework, set()).add(t.mode)
            template_ids.add(t.id)
        for im in images:
            modes.setdefault(im.framework, set())
            image_ids.add(im.id)
        return cls(
            modes={f: frozenset(m) for f, m in modes.items()},
            templates=frozenset(template_ids),
            images=frozenset(image_ids),
        )


_FIELDS = {
    "name",
    "framework",
    "mode",
    "version",
    "accelerator",
    "replicas",
    "procs_per_replica",
    "ps_replicas",
    "resources",
    "command",
    "args",
    "env",
    "program",
    "data",
    "working_dir",
    "template",
    "image",
    "backend",
    "namespace",
    "timeout",
}


def parse_request(
    data: Any, *, source: str = "job request", names: CatalogNames | None = None
) -> JobRequest:
    """Validate ``data`` and return a :class:`JobRequest`.

    Raises :class:`RequestError` listing every bad field (unknown fields included,
    so a typo such as ``replica:`` is not silently ignored). With ``names``, the
    framework, mode, template and image are also checked against the catalogs.
    """
    if isinstance(data, JobRequest):
        return data
    if not isinstance(data, Mapping):
        raise RequestError(
            [("(request)", f"must be a mapping of fields, got {type(data).__name__}")], source
        )
    problems: list[tuple[str, str]] = []
    out: dict[str, Any] = {}

    for key in data:
        if key not in _FIELDS:
            problems.append(
                (str(key), f"unknown field; known fields: {', '.join(sorted(_FIELDS))}")
            )

    def text(key: str, *, required: bool = False) -> str | None:
        v = data.get(key)
        if v is None:
            if required:
                problems.append((key, "is required"))
            return None
        if isinstance(v, int | float) and not isinstance(v, bool) and key == "version":
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            problems.append((key, f"must be a non-empty string, got {v!r}"))
            return None
        return v.strip()

    name = text("name", required=True)
    if name is not None and (not _NAME_RE.match(name) or len(name) > MAX_NAME_LEN):
        problems.append(
            (
                "name",
                f"must be lower-case letters, digits and '-', start and end with a "
                f"letter or digit, at most {MAX_NAME_LEN} characters; got {name!r}",
            )
        )
    has_explicit = data.get("template") is not None or data.get("image") is not None
    framework = text("framework", required=not has_explicit)
    out["name"] = name
    out["framework"] = framework.lower() if framework else ""
    for key in (
        "mode",
        "version",
        "program",
        "data",
        "working_dir",
        "template",
        "image",
        "namespace",
    ):
        v = text(key)
        if v is not None:
            out[key] = v
    if "namespace" in out and not _NAME_RE.match(out["namespace"]):
        problems.append(("namespace", f"must be a DNS-1123 label, got {out['namespace']!r}"))
    if "mode" in out:
        out["mode"] = out["mode"].lower()

    backend = text("backend")
    if backend is not None:
        if backend not in BACKENDS:
            problems.append(("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}"))
        else:
            out["backend"] = backend

    for key, lo in (("replicas", 1), ("procs_per_replica", 1), ("ps_replicas", 1)):
        v = data.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            problems.append((key, f"must be an integer >= {lo}, got {v!r}"))
        else:
            out[key] = v

    timeout = data.get("timeout")
    if timeout is not None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            problems.append(("timeout", f"must be a finite number of seconds > 0, got {timeout!r}"))
        else:
            out["timeout"] = float(timeout)

    res = data.get("resources")
    cpu = memory = None
    gpu = 0
    if res is not None:
        if not isinstance(res, Mapping):
            problems.append(("resources", f"must be a mapping with cpu, memory, gpu; got {res!r}"))
        else:
            for k in res:
                if k not in ("cpu", "memory", "gpu"):
                    problems.append((f"resources.{k}", "unknown field; known: cpu, memory, gpu"))
            if res.get("cpu") is not None:
                try:
                    cpu = parse_cpu(res["cpu"])
                except ValueError as e:
                    problems.append(("resources.cpu", str(e)))
            if res.get("memory") is not None:
                try:
                    memory = parse_memory(res["memory"])
                except ValueError as e:
                    problems.append(("resources.memory", str(e)))
            g = res.get("gpu", 0)
            if isinstance(g, bool) or not isinstance(g, int) or g < 0:
                problems.append(("resources.gpu", f"must be an integer >= 0, got {g!r}"))
            else:
                gpu = g
    out["resources"] = Resources(cpu=cpu, memory=memory, gpu=gpu)

    acc = data.get("accelerator")
    if acc is None:
        out["accelerator"] = "gpu" if gpu else "cpu"
    elif acc not in ACCELERATORS:
        problems.append(("accelerator", f"must be one of {', '.join(ACCELERATORS)}, got {acc!r}"))
    else:
        out["accelerator"] = acc
        if acc == "cpu" and gpu:
            problems.append(("accelerator", "is 'cpu' but resources.gpu asks for GPUs"))

    for key in ("command", "args"):
        v = data.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            v = [v] if key == "command" else v.split()
        if not isinstance(v, list | tuple) or not all(
            isinstance(x, str | int | float) and not isinstance(x, bool) for x in v
        ):
            problems.append((key, f"must be a list of strings, got {v!r}"))
        else:
            out[key] = tuple(str(x) for x in v)
    if "command" in out and not out["command"]:
        problems.append(("command", "must not be empty"))
    elif "command" in out and not out["command"][0].strip():
        problems.append(("command", "must start with the program to run, got an empty string"))

    env = data.get("env")
    if env is not None:
        if not isinstance(env, Mapping):
            problems.append(("env", f"must be a mapping of NAME: value, got {env!r}"))
        else:
            pairs = []
            for k, v in env.items():
                if not isinstance(k, str) or not _ENV_RE.match(k):
                    problems.append((f"env.{k}", "is not a valid environment variable name"))
                elif not isinstance(v, str | int | float):  # bool is an int
                    problems.append(
                        (f"env.{k}", f"must be a string or number (quote it), got {v!r}")
                    )
                else:
                    pairs.append((k, v if isinstance(v, str) else json.dumps(v)))
            out["env"] = tuple(sorted(pairs))

    if not out.get("program") and not out.get("command") and not has_explicit:
        problems.append(("program", "give program (a file to run) or command"))

    if names is not None:
        problems += _catalog_problems(out, names)

    if problems:
        raise RequestError(problems, source)
    return JobRequest(**out)


def _catalog_problems(out: Mapping[str, Any], names: CatalogNames) -> list[tuple[str, str]]:
    """The fields of a parsed request whose values the catalogs do not have."""
    problems: list[tuple[str, str]] = []
    hint = "(or add one with --catalog DIR)"
    framework = out.get("framework")
    if out.get("template") and out.get("image"):
        framework = None  # both explicit: selection does not use the framework
    if framework and framework not in names.modes:
        problems.append(
            (
                "framework",
                f"unknown framework {framework!r}; the catalogs have "
                f"{', '.join(sorted(names.modes)) or 'none'} {hint}",
            )
        )
    elif framework and not out.get("template") and names.modes[framework]:
        mode = out.get("mode", "single")
        if mode not in names.modes[framework]:
            default = "" if "mode" in out else " (the default)"
            problems.append(
                (
                    "mode",
                    f"framework {framework!r} has no mode {mode!r}{default}; its modes: "
                    f"{', '.join(sorted(names.modes[framework]))}",
                )
            )
    for key, known in (("template", names.templates), ("image", names.images)):
        value = out.get(key)
        if value is not None and value not in known:
            problems.append(
                (
                    key,
                    f"unknown {key} {value!r}; the catalogs have "
                    f"{', '.join(sorted(known)) or 'none'} {hint}",
                )
            )
    return problems


def load_request(path: str | Path, *, names: CatalogNames | None = None) -> JobRequest:
    """Read a YAML or JSON request file and validate it (against ``names``, if given).

    Relative ``program``, ``data`` and ``working_dir`` are taken relative to the file.
    """
    p = Path(path)
    try:
        raw = p.read_text()
    except OSError as e:
        raise RequestError([("(file)", f"cannot read {p}: {e.strerror}")], str(p)) from None
    try:
        data = json.loads(raw) if p.suffix == ".json" else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as e:
        msg = str(e).replace("\n", " ")
        raise RequestError([("(file)", f"is not valid YAML/JSON: {msg}")], str(p)) from None
    if isinstance(data, Mapping):
        data = dict(data)
        for key in ("program", "data", "working_dir"):
            v = data.get(key)
            if isinstance(v, str) and v and not Path(v).is_absolute() and "://" not in v:
                data[key] = str((p.parent / v).resolve())
    return parse_request(data, source=str(p), names=names)
