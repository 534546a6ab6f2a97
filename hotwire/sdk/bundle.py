"""Content-addressed app bundles, and loading an app from a file or a bundle.

A bundle is a deterministic zip (sorted entries, fixed timestamps and modes)
holding the app file as ``app.py`` and, optionally, one included directory
under its base name. Its hash is the sha256 of the zip bytes. Workers import a
bundle's ``app.py`` under a module name unique to the hash, so two versions of
the same app live side by side in one process.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import threading
import traceback
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hotwire.names import confined
from hotwire.sdk.errors import AppLoadError
from hotwire.sdk.topology import Topology

__all__ = ["Bundle", "load_app", "load_bundle", "make_bundle"]

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo")

_lock = threading.RLock()  # sys.path and sys.modules are process-wide
_loaded: dict[str, Topology] = {}  # bundle hash -> its Topology


@dataclass(frozen=True)
class Bundle:
    """A bundle's content hash (sha256 hex of ``data``) and its zip bytes."""

    hash: str
    data: bytes

    def __repr__(self) -> str:
        return f"Bundle({self.hash[:16]}, {len(self.data)} bytes)"


def make_bundle(
    app_path: str | os.PathLike[str], include: str | os.PathLike[str] | None = None
) -> Bundle:
    """Bundle the app file (as ``app.py``) and, with ``include``, that directory by its name."""
    app = Path(app_path)
    entries: dict[str, bytes] = {"app.py": app.read_bytes()}
    if include is not None:
        root = Path(include).resolve()
        if not root.is_dir():
            raise AppLoadError(f"{include}: --include needs a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            for fname in filenames:
                if fname.endswith(_SKIP_SUFFIXES):
                    continue
                path = Path(dirpath) / fname
                arc = f"{root.name}/{path.relative_to(root).as_posix()}"
                entries[arc] = path.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, entries[name])
    data = buf.getvalue()
    return Bundle(hashlib.sha256(data).hexdigest(), data)


def load_app(path: str | os.PathLike[str]) -> Topology:
    """Run an app file (on the client) and return its one module-level Topology."""
    file = Path(path)
    try:
        source = file.read_bytes()
    except OSError as e:
        raise AppLoadError(f"{path}: cannot read the app file: {e.strerror or e}") from e
    digest = hashlib.sha256(source).hexdigest()[:16]
    module_name = f"hotwire_app_file_{digest}"
    resolved = file.resolve()
    with _lock:
        names = _shadowed_names(resolved.parent, resolved)
        stashed = _stash_modules(names)
        try:
            module = _import(module_name, source, resolved, str(path), resolved.parent)
        finally:
            _drop_modules(names)
            sys.modules.update(stashed)
    return _the_topology(module, str(path))


def load_bundle(hash: str, data: bytes, cache_dir: str | os.PathLike[str]) -> Topology:
    """Verify, unpack (once, into ``cache_dir/hash``) and import a bundle; return its Topology.

    Loaded Topologies are cached per hash, so loading the same bundle again is cheap
    and yields the same objects.
    """
    with _lock:
        if hash in _loaded:
            return _loaded[hash]
        if hashlib.sha256(data).hexdigest() != hash:
            raise AppLoadError(f"bundle {hash[:16]}: content does not match its hash; resend it")
        bundle_dir = _unpack(hash, data, Path(cache_dir))
        app_file = bundle_dir / "app.py"
        label = f"app.py (bundle {hash[:16]})"
        names = _shadowed_names(bundle_dir, app_file)
        stashed = _stash_modules(names)
        try:
            module = _import(
                f"hotwire_app_{hash[:16]}", app_file.read_bytes(), app_file, label, bundle_dir
            )
        finally:
            _drop_modules(names)
            sys.modules.update(stashed)
        topology = _the_topology(module, label)
        _loaded[hash] = topology
        return topology


def unload_bundle(hash: str, cache_dir: str | os.PathLike[str]) -> None:
    """Forget a loaded bundle: its Topology, its module and its unpacked files."""
    with _lock:
        _loaded.pop(hash, None)
        sys.modules.pop(f"hotwire_app_{hash[:16]}", None)
        shutil.rmtree(confined(cache_dir, hash), ignore_errors=True)


def _unpack(hash: str, data: bytes, cache_dir: Path) -> Path:
    target = confined(cache_dir, hash)
    if (target / "app.py").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hash[:16]}-", dir=cache_dir))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                parts = Path(name).parts
                if name.startswith("/") or ".." in parts or not parts:
                    raise AppLoadError(f"bundle {hash[:16]}: unsafe entry {name!r}")
            if "app.py" not in zf.namelist():
                raise AppLoadError(f"bundle {hash[:16]}: no app.py in the bundle")
            zf.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "app.py").is_file():  # not a concurrent unpack of the same bundle
                raise
    except zipfile.BadZipFile as e:
        raise AppLoadError(f"bundle {hash[:16]}: not a zip file: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _import(
    module_name: str, source: bytes, file: Path, label: str, path_dir: Path
) -> types.ModuleType:
    """Execute ``source`` as module ``module_name`` with ``path_dir`` on sys.path."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    try:
        code = compile(source, str(file), "exec", dont_inherit=True)
    except SyntaxError as e:
        raise AppLoadError(f"{label}:{e.lineno}: SyntaxError: {e.msg}") from e
    module = types.ModuleType(module_name)
    module.__file__ = str(file)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path_dir))
    try:
        exec(code, module.__dict__)
    except BaseException as e:
        sys.modules.pop(module_name, None)
        if not isinstance(e, Exception):
            raise
        line = _line_in(e, str(file))
        where = f"{label}:{line}" if line else label
        raise AppLoadError(f"{where}: {type(e).__name__}: {e}") from e
    finally:
        try:
            sys.path.remove(str(path_dir))
        except ValueError:
            pass
    return module


def _line_in(exc: BaseException, filename: str) -> int | None:
    """The line of the innermost traceback frame in ``filename``."""
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def _the_topology(module: types.ModuleType, label: str) -> Topology:
    found: dict[int, tuple[str, Topology]] = {}
    for name, value in vars(module).items():
        if isinstance(value, Topology) and id(value) not in found:
            found[id(value)] = (name, value)
    if len(found) == 1:
        return next(iter(found.values()))[1]
    if not found:
        raise AppLoadError(
            f'{label}: defines no Topology; add a module-level app = Topology("name")'
        )
    names = ", ".join(sorted(n for n, _ in found.values()))
    raise AppLoadError(
        f"{label}: defines {len(found)} Topologies ({names}); an app file must define exactly one"
    )


def _shadowed_names(directory: Path, app_file: Path) -> set[str]:
    """Top-level modules ``directory`` provides besides the app file (e.g. an included package).

    Not ``hotwire`` and not standard-library names, which always come from the installation.
    """
    names = set()
    for entry in directory.iterdir():
        if entry.name == app_file.name or entry.name.startswith("."):
            continue
        if entry.suffix == ".py":
            name = entry.stem
        elif entry.is_dir():
            name = entry.name
        else:
            continue
        if name.isidentifier() and name != "hotwire" and name not in sys.stdlib_module_names:
            names.add(name)
    return names


def _stash_modules(names: set[str]) -> dict[str, types.ModuleType]:
    """Take the modules ``names`` (and their submodules) out of sys.modules, to restore later.

    So a bundle imports its own copy of an included package, not another version's.
    """
    stashed: dict[str, types.ModuleType] = {}
    if not names:  # the app file alone: nothing to look for among every loaded module
        return stashed
    for name in list(sys.modules):
        if name.split(".", 1)[0] in names:
            stashed[name] = sys.modules.pop(name)
    return stashed


def _drop_modules(names: set[str]) -> None:
    """Forget the bundle's own modules after its import (the app module keeps references)."""
    if not names:
        return
    for name in list(sys.modules):
        if name.split(".", 1)[0] in names:
            del sys.modules[name]
