"""The template and base-image catalogs, and selection of one of each for a request.

A catalog is a directory holding ``templates/*.j2`` (Jinja2 job-description
templates; each opens with a Jinja comment holding YAML metadata) and
``images.yaml`` (a list of base images). hotwire ships one under
``hotwire/jobs/catalog/``; user directories (``--catalog DIR`` or the
``HOTWIRE_JOBS_CATALOG`` environment variable, ``os.pathsep``-separated) are
layered over it, and a user entry replaces a shipped one with the same id.

Template metadata, at the very top of the file::

    {#---
    id: pytorch-ddp
    framework: pytorch
    mode: ddp
    accelerators: [cpu, gpu]
    versions: ["2"]          # optional: version prefixes the template supports
    description: PyTorch DistributedDataParallel, one torchrun agent per replica
    ---#}

Selection (:meth:`Catalog.select`) is pure: framework + version + mode +
accelerator (+ the backend, which the image must realise) give one template and
one image; an explicit ``template`` or ``image`` in the request wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from hotwire.jobs.errors import CatalogError, SelectionError
from hotwire.jobs.request import ACCELERATORS, BACKENDS, JobRequest

SHIPPED_DIR = Path(__file__).parent / "catalog"
CATALOG_ENV = "HOTWIRE_JOBS_CATALOG"

_META_RE = re.compile(r"\A\s*\{#-?(.*?)-?#\}", re.DOTALL)


@dataclass(frozen=True)
class Template:
    """A job-description template: one per (framework, mode)."""

    id: str
    framework: str
    mode: str
    path: Path
    accelerators: tuple[str, ...] = ACCELERATORS
    versions: tuple[str, ...] = ()
    description: str = ""
    source: str = "shipped"

    def supports_version(self, version: str) -> bool:
        return not self.versions or any(version_matches(v, version) for v in self.versions)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "framework": self.framework,
            "mode": self.mode,
            "accelerators": list(self.accelerators),
            "versions": list(self.versions),
            "description": self.description,
            "source": self.source,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class Image:
    """A base image: what it holds and how each backend realises it.

    ``backends`` maps a backend name to its realisation: for ``local``
    ``{"python": "current" | PATH}`` or ``{"venv": DIR}``; for ``podman`` and
    ``kubernetes`` ``{"image": REF, "python": "python3"}``.
    """

    id: str
    framework: str
    version: str
    accelerator: str
    backends: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    description: str = ""
    source: str = "shipped"

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "framework": self.framework,
            "version": self.version,
            "accelerator": self.accelerator,
            "backends": self.backends,
            "description": self.description,
            "source": self.source,
        }


@dataclass(frozen=True)
class Selection:
    template: Template
    image: Image


def version_matches(prefix: str, version: str) -> bool:
    """``"2.13"`` matches ``"2.13.0"`` and ``"2.13.1"``, not ``"2.1"`` nor ``"2.130"``."""
    a = str(prefix).split(".")
    b = str(version).split(".")
    return len(a) <= len(b) and b[: len(a)] == a


def _version_key(v: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+]", v))


def _as_tuple(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str | int | float):
        return (str(v),)
    return tuple(str(x) for x in v)


def parse_template(path: Path, source: str = "shipped") -> Template:
    """Read a template's metadata (it is not rendered here)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogError(f"cannot read template {path}: {e.strerror}") from None
    m = _META_RE.match(text)
    if not m:
        raise CatalogError(
            f"template {path} has no metadata: open it with a Jinja comment "
            "'{#--- id: ..., framework: ..., mode: ... ---#}'"
        )
    body = m.group(1).strip().strip("-").strip()
    try:
        meta = yaml.safe_load(body) or {}
    except yaml.YAMLError as e:
        raise CatalogError(f"template {path}: metadata is not YAML: {e}") from None
    missing = [k for k in ("id", "framework", "mode") if not meta.get(k)]
    if missing:
        raise CatalogError(f"template {path}: metadata lacks {', '.join(missing)}")
    accs = _as_tuple(meta.get("accelerators")) or ACCELERATORS
    bad = [a for a in accs if a not in ACCELERATORS]
    if bad:
        raise CatalogError(f"template {path}: unknown accelerators {bad}; use cpu and/or gpu")
    return Template(
        id=str(meta["id"]),
        framework=str(meta["framework"]).lower(),
        mode=str(meta["mode"]).lower(),
        path=path,
        accelerators=accs,
        versions=_as_tuple(meta.get("versions")),
        description=str(meta.get("description", "")),
        source=source,
    )


def parse_images(path: Path, source: str = "shipped") -> list[Image]:
    """Read an ``images.yaml``: a list (or ``{images: [...]}``) of image entries."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CatalogError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CatalogError(f"{path} is not YAML: {e}") from None
    if isinstance(data, dict):
        data = data.get("images")
    if not isinstance(data, list):
        raise CatalogError(f"{path}: expected a list of images (or 'images: [...]')")
    out = []
    for i, e in enumerate(data):
        where = f"{path} entry {i}"
        if not isinstance(e, dict):
            raise CatalogError(f"{where}: expected a mapping")
        missing = [k for k in ("id", "framework", "version", "accelerator") if e.get(k) is None]
        if missing:
            raise CatalogError(f"{where} ({e.get('id', '?')}): lacks {', '.join(missing)}")
        if e["accelerator"] not in ACCELERATORS:
            raise CatalogError(f"{where} ({e['id']}): accelerator must be cpu or gpu")
        backends = e.get("backends") or {}
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise CatalogError(
                f"{where} ({e['id']}): unknown backends {unknown}; known: {', '.join(BACKENDS)}"
            )
        for b in ("podman", "kubernetes"):
            if b in backends and not (backends[b] or {}).get("image"):
                raise CatalogError(f"{where} ({e['id']}): backends.{b} needs 'image'")
        out.append(
            Image(
                id=str(e["id"]),
                framework=str(e["framework"]).lower(),
                version=str(e["version"]),
                accelerator=str(e["accelerator"]),
                backends={k: dict(v or {}) for k, v in backends.items()},
                description=str(e.get("description", "")),
                source=source,
            )
        )
    return out


def catalog_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    """User catalog directories: ``extra`` first, then ``$HOTWIRE_JOBS_CATALOG``."""
    dirs = [Path(d) for d in extra]
    env = os.environ.get(CATALOG_ENV, "")
    dirs += [Path(d) for d in env.split(os.pathsep) if d]
    return dirs


class Catalog:
    """The shipped catalog with user directories layered over it."""

    def __init__(
        self, templates: Sequence[Template], images: Sequence[Image], search_path: Sequence[Path]
    ) -> None:
        self.templates: dict[str, Template] = {}
        for t in templates:
            self.templates[t.id] = t  # later (user) entries replace earlier ones
        self.images: dict[str, Image] = {}
        for im in images:
            self.images[im.id] = im
        self.search_path = list(search_path)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(p) for p in self.search_path]),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        self.env.filters["tojson"] = _tojson
        self.env.filters["quote"] = _tojson

    @classmethod
    def load(cls, dirs: Iterable[str | Path] = (), *, use_env: bool = True) -> Catalog:
        """Load the shipped catalog and the user ``dirs`` (and ``$HOTWIRE_JOBS_CATALOG``)."""
        user = catalog_dirs(dirs) if use_env else [Path(d) for d in dirs]
        layers: list[tuple[Path, str]] = [(SHIPPED_DIR, "shipped")]
        for d in reversed(user):  # the first user dir given wins
            if not d.is_dir():
                raise CatalogError(f"catalog directory {d} does not exist")
            layers.append((d, str(d)))
        templates: list[Template] = []
        images: list[Image] = []
        for d, source in layers:
            tdir = d / "templates"
            for p in sorted(tdir.glob("*.j2")) if tdir.is_dir() else []:
                if not p.name.startswith("_"):
                    templates.append(parse_template(p, source))
            if (d / "images.yaml").is_file():
                images += parse_images(d / "images.yaml", source)
        search = [d / "templates" for d, _ in reversed(layers)]
        return cls(templates, images, search)

    def template(self, template_id: str) -> Template:
        try:
            return self.templates[template_id]
        except KeyError:
            raise SelectionError(
                f"no template {template_id!r}; templates: {', '.join(sorted(self.templates))}",
                sorted(self.templates),
            ) from None

    def image(self, image_id: str) -> Image:
        try:
            return self.images[image_id]
        except KeyError:
            raise SelectionError(
                f"no image {image_id!r}; images: {', '.join(sorted(self.images))}",
                sorted(self.images),
            ) from None

    def jinja_template(self, t: Template) -> jinja2.Template:
        return self.env.from_string(t.path.read_text())

    # -- selection -----------------------------------------------------------------

    def select(self, request: JobRequest, backend: str) -> Selection:
        """One template and one image for ``request`` on ``backend``.

        Raises :class:`SelectionError` listing the candidates when nothing fits or
        when two entries fit equally well.
        """
        image = self._select_image(request, backend)
        template = self._select_template(request, image)
        return Selection(template=template, image=image)

    def _select_image(self, r: JobRequest, backend: str) -> Image:
        if r.image:
            im = self.image(r.image)
            if backend not in im.backends:
                raise SelectionError(
                    f"image {im.id!r} has no realisation for backend {backend!r} "
                    f"(it has: {', '.join(im.backends) or 'none'}); add backends.{backend} "
                    "to it in a user catalog or pick another backend",
                    [im.id],
                )
            return im
        framework = r.framework
        if not framework and r.template:
            framework = self.template(r.template).framework
        same_fw = [im for im in self.images.values() if im.framework == framework]
        fits = [
            im
            for im in same_fw
            if im.accelerator == r.accelerator
            and (r.version is None or version_matches(r.version, im.version))
        ]
        runnable = [im for im in fits if backend in im.backends]
        if not runnable:
            pool = same_fw or list(self.images.values())
            cands = [
                f"{im.id} ({im.framework} {im.version}, {im.accelerator}, "
                f"backends: {', '.join(im.backends)})"
                for im in sorted(pool, key=lambda i: i.id)
            ]
            why = f"none of them realised for backend {backend!r}" if fits else "none matches"
            raise SelectionError(
                f"no image for framework {framework!r}"
                f"{f' version {r.version!r}' if r.version else ''} accelerator "
                f"{r.accelerator!r} on backend {backend!r} ({why}); candidates: "
                f"{'; '.join(cands) or 'none'}. Set 'image:' in the request or add an image "
                "with --catalog DIR",
                [im.id for im in pool],
            )
        runnable.sort(
            key=lambda im: (_version_key(im.version), im.source != "shipped"), reverse=True
        )
        best = runnable[0]
        ties = [im for im in runnable if im.version == best.version]
        if len(ties) > 1:
            ids = sorted(im.id for im in ties)
            raise SelectionError(
                f"several images fit framework {framework!r} version {best.version!r} "
                f"accelerator {r.accelerator!r}: {', '.join(ids)}; set 'image:' in the request",
                ids,
            )
        return best

    def _select_template(self, r: JobRequest, image: Image) -> Template:
        if r.template:
            return self.template(r.template)
        framework = r.framework or image.framework
        fits = [
            t
            for t in self.templates.values()
            if t.framework == framework
            and t.mode == r.mode
            and r.accelerator in t.accelerators
            and t.supports_version(image.version)
        ]
        if len(fits) == 1:
            return fits[0]
        pool = [t for t in self.templates.values() if t.framework == framework] or list(
            self.templates.values()
        )
        cands = sorted(f"{t.id} ({t.framework}/{t.mode})" for t in pool)
        if not fits:
            raise SelectionError(
                f"no template for framework {framework!r} mode {r.mode!r} accelerator "
                f"{r.accelerator!r} (image {image.id} {image.version}); candidates: "
                f"{', '.join(cands)}. Set 'mode:' or 'template:' in the request, or add a "
                "template with --catalog DIR",
                [t.id for t in pool],
            )
        ids = sorted(t.id for t in fits)
        raise SelectionError(
            f"several templates fit framework {framework!r} mode {r.mode!r}: {', '.join(ids)}; "
            "set 'template:' in the request",
            ids,
        )


def _tojson(v: Any) -> str:
    import json

    return json.dumps(v)
