"""Behaviour fingerprints of callables and classes.

A fingerprint is a sha256 hex digest over what a callable does: its bytecode,
constants (nested code objects recursively), names, argument layout, closure
values, defaults and the same-module functions, classes and constants it refers
to through its globals. Line numbers, file names, comments and formatting are
left out, so moving or reformatting code keeps the fingerprint. Fingerprints
are stable across processes (no ``id``, no set iteration order, no addresses).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import types
from typing import Any

__all__ = ["fingerprint", "pe_fingerprint"]

_SCALARS = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))
# Class attributes that are bookkeeping, not behaviour.
_CLASS_SKIP = frozenset(
    {
        "__module__",
        "__qualname__",
        "__dict__",
        "__weakref__",
        "__firstlineno__",
        "__static_attributes__",
        "_abc_impl",
    }
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_APP_FILE_MODULE = re.compile(r"hotwire_app_file_[0-9a-f]+$")
_LIBRARY_ROOTS = frozenset(sys.stdlib_module_names) | {"hotwire", "builtins"}


def fingerprint(obj: Any) -> str:
    """The behaviour fingerprint of ``obj`` (function, class, method, partial or value)."""
    return _Walker().top(obj)


def pe_fingerprint(kind: str, target: Any, config: dict[str, Any]) -> str:
    """A PE's fingerprint: its kind, its callable's (or class's) fingerprint and its config."""
    body = {
        "kind": kind,
        "callable": "" if target is None else fingerprint(target),
        "config": config,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _is_library(module: str | None) -> bool:
    return module is None or module.split(".", 1)[0] in _LIBRARY_ROOTS


def _qualified(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or ""
    if _APP_FILE_MODULE.match(mod):
        # An app file is imported under a name made from its content's hash
        # (hotwire.sdk.bundle): any edit renames it, so the name says nothing.
        mod = "<app file>"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or ""
    return f"{mod}.{name}"


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


class _Walker:
    """One fingerprint computation: a cycle guard and a memo keyed by object id."""

    def __init__(self) -> None:
        self._active: set[int] = set()
        self._memo: dict[int, str] = {}
        self._alive: list[Any] = []  # keeps memoised objects alive so ids stay unique

    def top(self, obj: Any) -> str:
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, type):
            return self._class(obj)
        if isinstance(obj, types.CodeType):
            return _digest(self._code(obj))
        return _digest(self._value(obj, deep=True))

    # -- guarded recursion ---------------------------------------------------
    def _guarded(self, obj: Any, build: Any) -> str:
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        if key in self._active:
            return f"cycle:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
        self._active.add(key)
        try:
            result: str = build(obj)
        finally:
            self._active.discard(key)
        self._memo[key] = result
        self._alive.append(obj)
        return result

    # -- code and functions --------------------------------------------------
    def _code(self, co: types.CodeType) -> tuple[Any, ...]:
        return (
            "code",
            co.co_name,
            co.co_argcount,
            co.co_posonlyargcount,
            co.co_kwonlyargcount,
            co.co_nlocals,
            co.co_flags,
            co.co_stacksize,
            co.co_code.hex(),
            tuple(self._const(c) for c in co.co_consts),
            co.co_names,
            co.co_varnames,
            co.co_freevars,
            co.co_cellvars,
            getattr(co, "co_exceptiontable", b"").hex(),
        )

    def _const(self, c: Any) -> Any:
        if isinstance(c, types.CodeType):
            return self._code(c)
        if isinstance(c, tuple):
            return ("tuple", tuple(self._const(x) for x in c))
        if isinstance(c, frozenset):
            return ("frozenset", tuple(sorted(repr(self._const(x)) for x in c)))
        return (type(c).__name__, repr(c))

    def _function(self, fn: types.FunctionType) -> str:
        return self._guarded(fn, self._build_function)

    def _build_function(self, fn: types.FunctionType) -> str:
        code = fn.__code__
        g = fn.__globals__
        cells = []
        for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
            try:
                cells.append((name, self._value(cell.cell_contents, deep=True)))
            except ValueError:  # an empty cell
                cells.append((name, "<empty>"))
        kwdefaults = fn.__kwdefaults__ or {}
        refs = []
        home = g.get("__name__", "builtins")
        for name in sorted(_code_names(code)):
            if name in g:
                refs.append((name, self._global(g[name], g, home)))
        parts = (
            "function",
            self._code(code),
            self._value(fn.__defaults__, deep=True),
            tuple((k, self._value(kwdefaults[k], deep=True)) for k in sorted(kwdefaults)),
            tuple(cells),
            tuple(refs),
        )
        return _digest(parts)

    def _global(self, v: Any, g: dict[str, Any], home: str) -> Any:
        """A global a function refers to: same-module code deeply, anything else by name."""
        if isinstance(v, types.FunctionType):
            return self._function(v) if v.__globals__ is g else ("ref", _qualified(v))
        if isinstance(v, type):
            return self._class(v) if v.__module__ == home else ("ref", _qualified(v))
        if isinstance(v, types.ModuleType):
            return ("module", v.__name__)
        return self._value(v, deep=False)

    # -- classes ---------------------------------------------------------------
    def _class(self, cls: type) -> str:
        return self._guarded(cls, self._build_class)

    def _build_class(self, cls: type) -> str:
        bases = []
        for b in cls.__bases__:
            if b is object:
                continue
            same = b.__module__ == cls.__module__ and not _is_library(b.__module__)
            bases.append((b.__qualname__, self._class(b) if same else _qualified(b)))
        attrs = []
        for name in sorted(cls.__dict__):
            if name in _CLASS_SKIP:
                continue
            attrs.append((name, self._attr(cls.__dict__[name])))
        return _digest(("class", cls.__name__, tuple(bases), tuple(attrs)))

    def _attr(self, v: Any) -> Any:
        if isinstance(v, (staticmethod, classmethod)):
            return (type(v).__name__, self._value(v.__func__, deep=True))
        if isinstance(v, property):
            return ("property", *(self._value(f, deep=True) for f in (v.fget, v.fset, v.fdel)))
        return self._value(v, deep=True)

    # -- values ----------------------------------------------------------------
    def _value(self, v: Any, deep: bool) -> Any:
        """A value seen in a closure, a default, a global or a class attribute.

        ``deep``: fingerprint user functions and classes it holds (not library ones).
        """
        if isinstance(v, _SCALARS):
            return (type(v).__name__, repr(v))
        if isinstance(v, (tuple, list, set, frozenset, dict)):
            if id(v) in self._active:
                return ("cycle", type(v).__name__)
            self._active.add(id(v))
            try:
                return self._container(v, deep)
            finally:
                self._active.discard(id(v))
        return self._other(v, deep)

    def _container(self, v: Any, deep: bool) -> Any:
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, tuple(self._value(x, deep) for x in v))
        if isinstance(v, (set, frozenset)):
            return (type(v).__name__, tuple(sorted(repr(self._value(x, deep)) for x in v)))
        if isinstance(v, dict):
            items = [(repr(self._value(k, deep)), self._value(x, deep)) for k, x in v.items()]
            return ("dict", tuple(sorted(items, key=lambda kv: kv[0])))
        raise TypeError(type(v))

    def _other(self, v: Any, deep: bool) -> Any:
        if isinstance(v, types.FunctionType):
            if deep and not _is_library(v.__module__):
                return self._function(v)
            return ("ref", _qualified(v))
        if isinstance(v, type):
            if deep and not _is_library(v.__module__):
                return self._class(v)
            return ("ref", _qualified(v))
        if isinstance(v, types.MethodType):
            return ("method", self._value(v.__func__, deep), self._value(v.__self__, deep))
        if isinstance(v, functools.partial):
            return (
                "partial",
                self._value(v.func, deep),
                self._value(v.args, deep),
                self._value(v.keywords, deep),
            )
        if isinstance(v, types.ModuleType):
            return ("module", v.__name__)
        if isinstance(v, types.CodeType):
            return self._code(v)
        if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return ("builtin", _qualified(v))
        return self._object(v, deep)

    def _object(self, v: Any, deep: bool) -> Any:
        """Any other object: its type, and when ``deep`` its instance attributes.

        Library objects without instance attributes (paths, patterns, ...) are
        represented by their repr, with any memory address removed.
        """
        cls = type(v)
        user = not _is_library(cls.__module__)
        kind = self._class(cls) if deep and user else _qualified(cls)
        state = getattr(v, "__dict__", None)
        if not isinstance(state, dict) and not user:
            try:
                text = _ADDRESS.sub("", repr(v))
            except Exception:
                text = ""
            return ("object", kind, text)
        if not deep or not isinstance(state, dict):
            return ("object", kind)
        return ("object", kind, self._guarded(v, lambda o: _digest(self._value(state, deep))))
