"""Catalogs: the shipped entries, user catalogs over them, and selection."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hotwire.jobs import Catalog, CatalogError, SelectionError, parse_request
from hotwire.jobs.catalog import version_matches

BASE = {"name": "j", "framework": "pytorch", "command": ["true"]}


def req(**kw: object):
    return parse_request({**BASE, **kw})


@pytest.fixture
def cat() -> Catalog:
    return Catalog.load(use_env=False)


def test_shipped_catalog_has_the_required_templates_and_images(cat: Catalog) -> None:
    modes = {(t.framework, t.mode) for t in cat.templates.values()}
    assert {
        ("pytorch", "single"),
        ("pytorch", "ddp"),
        ("tensorflow", "ps"),
        ("generic", "single"),
    } <= modes
    im = cat.images["pytorch-2.13-cpu"]
    assert (im.framework, im.version, im.accelerator) == ("pytorch", "2.13.0", "cpu")
    assert set(im.backends) == {"local", "podman", "kubernetes"}


@pytest.mark.parametrize(
    ("kw", "backend", "template", "image"),
    [
        ({}, "local", "pytorch-single", "pytorch-2.13-cpu"),
        ({"mode": "ddp", "version": "2.13"}, "local", "pytorch-ddp", "pytorch-2.13-cpu"),
        ({"resources": {"gpu": 1}}, "kubernetes", "pytorch-single", "pytorch-2.5-gpu"),
        ({"version": "2"}, "kubernetes", "pytorch-single", "pytorch-2.13-cpu"),
        (
            {"framework": "tensorflow", "mode": "ps"},
            "kubernetes",
            "tensorflow-ps",
            "tensorflow-2.16-cpu",
        ),
        ({"framework": "generic"}, "podman", "generic", "python-3.11"),
    ],
)
def test_selection(cat: Catalog, kw: dict, backend: str, template: str, image: str) -> None:
    s = cat.select(req(**kw), backend)
    assert (s.template.id, s.image.id) == (template, image)


def test_explicit_template_and_image_win(cat: Catalog) -> None:
    s = cat.select(req(template="generic", image="python-3.11"), "local")
    assert (s.template.id, s.image.id) == ("generic", "python-3.11")
    # framework may be left out when an image names it
    s = cat.select(
        parse_request({"name": "j", "image": "pytorch-2.13-cpu", "command": ["x"]}), "local"
    )
    assert s.template.id == "pytorch-single"


def test_no_image_lists_the_candidates(cat: Catalog) -> None:
    with pytest.raises(SelectionError) as ei:
        cat.select(req(version="3.0"), "local")
    msg = str(ei.value)
    assert "no image for framework 'pytorch' version '3.0' accelerator 'cpu'" in msg
    assert "pytorch-2.13-cpu (pytorch 2.13.0, cpu" in msg and "pytorch-2.5-gpu" in msg
    assert ei.value.candidates == ["pytorch-2.13-cpu", "pytorch-2.5-gpu"]


def test_an_image_the_backend_cannot_run_is_explained(cat: Catalog) -> None:
    with pytest.raises(SelectionError, match="none of them realised for backend 'local'"):
        cat.select(req(resources={"gpu": 1}), "local")
    with pytest.raises(
        SelectionError,
        match=re.escape("image 'pytorch-2.5-gpu' has no realisation for backend 'local'"),
    ):
        cat.select(req(image="pytorch-2.5-gpu"), "local")


def test_no_template_lists_the_candidates(cat: Catalog) -> None:
    with pytest.raises(SelectionError) as ei:
        cat.select(req(mode="horovod"), "local")
    assert "no template for framework 'pytorch' mode 'horovod'" in str(ei.value)
    assert set(ei.value.candidates) == {"pytorch-single", "pytorch-ddp"}


def test_unknown_explicit_ids(cat: Catalog) -> None:
    with pytest.raises(SelectionError, match="no template 'nope'; templates: generic, "):
        cat.select(req(template="nope"), "local")
    with pytest.raises(SelectionError, match="no image 'nope'; images: "):
        cat.select(req(image="nope"), "local")


def write_user_catalog(d: Path) -> Path:
    (d / "templates").mkdir(parents=True)
    (d / "templates" / "pytorch-single.j2").write_text(
        "{#---\nid: pytorch-single\nframework: pytorch\nmode: single\n"
        "description: mine\n---#}\n{% import '_pod.j2' as pod with context %}\n"
        "{{ pod.job(name, replicas, main, env) }}\n"
    )
    (d / "templates" / "jax-single.j2").write_text(
        "{#---\nid: jax-single\nframework: jax\nmode: single\n---#}\n"
        "{% import '_pod.j2' as pod with context %}\n{{ pod.job(name, 1, main, env) }}\n"
    )
    (d / "images.yaml").write_text(
        "- id: pytorch-2.13-cpu\n  framework: pytorch\n  version: '2.13.1'\n  accelerator: cpu\n"
        "  backends: {local: {python: current}}\n"
        "- id: jax-0.4\n  framework: jax\n  version: '0.4.30'\n  accelerator: cpu\n"
        "  backends: {local: {venv: /opt/jax}}\n"
    )
    return d


def test_user_catalog_overrides_by_id_and_adds(tmp_path: Path) -> None:
    cat = Catalog.load([write_user_catalog(tmp_path / "mine")], use_env=False)
    assert cat.templates["pytorch-single"].description == "mine"
    assert cat.templates["pytorch-single"].source == str(tmp_path / "mine")
    assert cat.images["pytorch-2.13-cpu"].version == "2.13.1"
    assert cat.templates["pytorch-ddp"].source == "shipped"
    s = cat.select(parse_request({"name": "j", "framework": "jax", "command": ["x"]}), "local")
    assert (s.template.id, s.image.id) == ("jax-single", "jax-0.4")


def test_user_catalog_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTWIRE_JOBS_CATALOG", str(write_user_catalog(tmp_path / "env")))
    assert "jax-single" in Catalog.load().templates


def test_several_images_at_the_same_version_are_ambiguous(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "images.yaml").write_text(
        "images:\n- {id: pt-a, framework: pytorch, version: '9.0', accelerator: cpu, "
        "backends: {local: {}}}\n- {id: pt-b, framework: pytorch, version: '9.0', "
        "accelerator: cpu, backends: {local: {}}}\n"
    )
    cat = Catalog.load([d], use_env=False)
    with pytest.raises(SelectionError, match=r"several images fit .*pt-a, pt-b") as ei:
        cat.select(req(), "local")
    assert ei.value.candidates == ["pt-a", "pt-b"]
    assert cat.select(req(image="pt-b"), "local").image.id == "pt-b"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no metadata here", "has no metadata"),
        ("{#---\nid: x\n---#}", "metadata lacks framework, mode"),
        ("{#---\nid: x\nframework: f\nmode: m\naccelerators: [tpu]\n---#}", "unknown accelerators"),
    ],
)
def test_bad_template_metadata(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "bad.j2").write_text(text)
    with pytest.raises(CatalogError, match=error):
        Catalog.load([tmp_path], use_env=False)


def test_bad_images(tmp_path: Path) -> None:
    (tmp_path / "images.yaml").write_text(
        "- {id: x, framework: f, version: 1, accelerator: cpu, backends: {podman: {python: p}}}\n"
    )
    with pytest.raises(CatalogError, match=re.escape("(x): backends.podman needs 'image'")):
        Catalog.load([tmp_path], use_env=False)
    with pytest.raises(CatalogError, match="does not exist"):
        Catalog.load([tmp_path / "missing"], use_env=False)


def test_version_prefixes() -> None:
    assert version_matches("2.13", "2.13.0")
    assert version_matches("2", "2.13.0")
    assert not version_matches("2.1", "2.13.0")
    assert not version_matches("2.13.0.1", "2.13.0")
