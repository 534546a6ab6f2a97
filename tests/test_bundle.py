"""Bundles: deterministic zips, content hashes, app loading and side-by-side versions."""

from __future__ import annotations

import hashlib
import io
import os
import textwrap
import zipfile
from pathlib import Path

import pytest

from hotwire.sdk import AppLoadError, Topology
from hotwire.sdk.bundle import Bundle, load_app, load_bundle, make_bundle

APP = """
from hotwire import Topology
from helpers.scale import FACTOR

def double(r):
    return r * FACTOR

def read(ctx):
    yield from range(3)

app = Topology("doubler")
app.source("src", read).map("double", double).sink("out", print)
"""


def write_app(tmp: Path, text: str = APP, name: str = "app_file.py") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def write_helpers(tmp: Path, factor: int = 2) -> Path:
    pkg = tmp / "helpers"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scale.py").write_text(f"FACTOR = {factor}\n")
    cache = pkg / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "scale.cpython-311.pyc").write_bytes(b"junk")
    return pkg


def test_bundle_is_deterministic(tmp_path: Path) -> None:
    app = write_app(tmp_path)
    helpers = write_helpers(tmp_path)
    a = make_bundle(app, include=helpers)
    os.utime(app, (1, 1))
    os.utime(helpers / "scale.py", (12345, 12345))
    b = make_bundle(str(app), include=str(helpers))
    assert isinstance(a, Bundle)
    assert a == b
    assert a.hash == hashlib.sha256(a.data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(a.data)) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert names == ["app.py", "helpers/__init__.py", "helpers/scale.py"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
        assert zf.read("app.py") == app.read_bytes()


def test_bundle_hash_follows_content(tmp_path: Path) -> None:
    app = write_app(tmp_path)
    helpers = write_helpers(tmp_path)
    a = make_bundle(app, include=helpers)
    assert make_bundle(app).hash != a.hash
    (helpers / "scale.py").write_text("FACTOR = 3\n")
    assert make_bundle(app, include=helpers).hash != a.hash


def test_load_bundle_and_cache(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    bundle = make_bundle(write_app(src), include=write_helpers(src))
    cache = tmp_path / "cache"
    topo = load_bundle(bundle.hash, bundle.data, cache)
    assert isinstance(topo, Topology) and topo.name == "doubler"
    assert (cache / bundle.hash / "app.py").is_file()
    assert (cache / bundle.hash / "helpers" / "scale.py").is_file()
    double = topo.impl("double").fn
    assert double is not None and double(5) == 10
    assert double.__module__ == f"hotwire_app_{bundle.hash[:16]}"
    assert load_bundle(bundle.hash, bundle.data, cache) is topo
    assert topo.model().pe("double").kind == "map"


def test_two_versions_side_by_side(tmp_path: Path) -> None:
    v0, v1, v2 = tmp_path / "v0", tmp_path / "v1", tmp_path / "v2"
    for d in (v0, v1, v2):
        d.mkdir()
    write_helpers(v0, factor=100)
    load_app(write_app(v0, APP.replace('"doubler"', '"client"')))  # a 'helpers' in sys.modules
    b1 = make_bundle(write_app(v1), include=write_helpers(v1, factor=2))
    b2 = make_bundle(
        write_app(v2, APP.replace("r * FACTOR", "r * FACTOR + 1")), write_helpers(v2, 3)
    )
    cache = tmp_path / "cache"
    t1 = load_bundle(b1.hash, b1.data, cache)
    t2 = load_bundle(b2.hash, b2.data, cache)
    f1, f2 = t1.impl("double").fn, t2.impl("double").fn
    assert f1 is not f2
    assert f1 is not None and f2 is not None
    assert f1(5) == 10 and f2(5) == 16  # each version sees its own helpers package
    m1, m2 = t1.model(), t2.model()
    assert m1.pe("double").fingerprint != m2.pe("double").fingerprint
    assert m1.pe("src").fingerprint == m2.pe("src").fingerprint


def test_load_bundle_rejects_bad_hash_and_garbage(tmp_path: Path) -> None:
    bundle = make_bundle(
        write_app(tmp_path, APP.replace("from helpers.scale import FACTOR", "FACTOR = 2"))
    )
    with pytest.raises(AppLoadError, match="does not match its hash"):
        load_bundle("0" * 64, bundle.data, tmp_path / "cache")
    garbage = b"not a zip"
    with pytest.raises(AppLoadError, match="not a zip"):
        load_bundle(hashlib.sha256(garbage).hexdigest(), garbage, tmp_path / "cache")
    assert not (tmp_path / "cache" / ("0" * 64)).exists()


def test_load_bundle_error_names_app_py_and_line(tmp_path: Path) -> None:
    bundle = make_bundle(
        write_app(tmp_path, "from hotwire import Topology\n\nraise KeyError('x')\n")
    )
    with pytest.raises(AppLoadError, match=r"^app\.py \(bundle [0-9a-f]{16}\):3: KeyError"):
        load_bundle(bundle.hash, bundle.data, tmp_path / "cache")


def test_load_app(tmp_path: Path) -> None:
    path = write_app(tmp_path, APP.replace("from helpers.scale import FACTOR", "FACTOR = 2"))
    topo = load_app(path)
    assert topo.name == "doubler"
    assert load_app(path) is topo  # same content, same module
    fn = topo.impl("double").fn
    assert fn is not None and fn(4) == 8


def test_load_app_imports_helpers_next_to_it(tmp_path: Path) -> None:
    write_helpers(tmp_path, factor=7)
    topo = load_app(write_app(tmp_path, APP.replace('"doubler"', '"near"')))
    fn = topo.impl("double").fn
    assert fn is not None and fn(1) == 7


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("x = 1\n", r"defines no Topology; add a module-level app = Topology"),
        (
            "from hotwire import Topology\na = Topology('a')\nb = Topology('b')\n",
            r"defines 2 Topologies \(a, b\); an app file must define exactly one",
        ),
        ("from hotwire import Topology\n\ndef f(:\n", r":3: SyntaxError: "),
        ("import os\n\n\nos.nope()\n", r":4: AttributeError: module 'os' has no attribute"),
        ("def f():\n    return 1 / 0\n\nf()\n", r":2: ZeroDivisionError: division by zero"),
    ],
)
def test_load_app_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = write_app(tmp_path, text, name="bad_app.py")
    with pytest.raises(AppLoadError, match=pattern) as info:
        load_app(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))


def test_same_topology_under_two_names_counts_once(tmp_path: Path) -> None:
    text = (
        "from hotwire import Topology\napp = Topology('one')\nalias = app\n"
        "app.source('s', lambda ctx: iter(())).sink('o', print)\n"
    )
    assert load_app(write_app(tmp_path, text)).name == "one"


def test_load_app_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AppLoadError, match="cannot read the app file"):
        load_app(tmp_path / "nope.py")


def test_examples_load_and_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    for name, pes in [
        ("wordcount.py", {"sentences", "words", "counts", "print"}),
        ("keyed_totals.py", {"orders", "valid", "totals", "print"}),
    ]:
        model = load_app(root / name).model()
        assert {p.name for p in model.pes} == pes
        assert any(p.kind == "reduce" and p.keyed for p in model.pes)
