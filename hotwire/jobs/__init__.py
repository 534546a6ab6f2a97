"""Deep-learning jobs: catalogs, job requests, rendering, backends and the DL PE.

See docs/jobs.md. The names here are the public API of ``hotwire.jobs``.
"""

from __future__ import annotations

from hotwire.jobs.catalog import Catalog, Image, Selection, Template
from hotwire.jobs.errors import (
    BackendUnavailable,
    CatalogError,
    JobError,
    JobNotFound,
    RenderError,
    RequestError,
    SelectionError,
)
from hotwire.jobs.render import RenderedJob, render
from hotwire.jobs.request import JobRequest, load_request, parse_request
from hotwire.jobs.serve import serve

__all__ = [
    "BackendUnavailable",
    "Catalog",
    "CatalogError",
    "Image",
    "JobError",
    "JobNotFound",
    "JobRequest",
    "RenderError",
    "RenderedJob",
    "RequestError",
    "Selection",
    "SelectionError",
    "Template",
    "load_request",
    "parse_request",
    "render",
    "serve",
]
