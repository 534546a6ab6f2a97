"""Names that end up in paths, and paths confined to their directory.

One rule for every name a client chooses and the cluster turns into a path, a
log line or a certificate subject (apps, PEs, workers): :data:`NAME_RULE`. The
master checks it on every model it receives, the SDK on the client before
anything is sent.

:func:`confined` is the second line of defence: every file path built from a
name goes through it, so even a name that slipped past the rule cannot reach
outside its directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NAME_RULE = "use 1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
# \A and \Z (not ^ and $, which also match before a final newline), so .match is safe too.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
MAX_NAME_LEN = 63


class PathEscape(ValueError):
    """A path built from names would lie outside the directory it belongs in."""


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.match(name) is not None


def shown(name: object, most: int = 70) -> str:
    """``repr(name)``, cut short when long: names in messages stay on one short line."""
    if isinstance(name, str) and len(name) > most:
        return f"{name[:most]!r}... ({len(name)} characters)"
    return repr(name)


def name_problem(name: object, what: str) -> str | None:
    """None when ``name`` follows :data:`NAME_RULE`; else one line naming it.

    ``what`` says whose name it is: ``"app 'x'"``, ``"PE 'p' of app 'x'"``.
    """
    if is_valid_name(name):
        return None
    return f"{what}: the name is not allowed; {NAME_RULE}"


def confined(base: str | os.PathLike[str], *parts: str) -> Path:
    """``base/part/...`` resolved, raising :class:`PathEscape` unless it lies inside ``base``.

    Symbolic links are followed on both sides, so a link inside ``base`` that
    points out of it is refused too. The result is never ``base`` itself.
    """
    root = Path(base).resolve()
    where = " / ".join(shown(p) for p in parts) or "no name"
    try:
        path = root.joinpath(*parts).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a symlink loop
        raise PathEscape(f"{where} is not a usable path under {root}: {e}") from e
    if path == root or not path.is_relative_to(root):
        raise PathEscape(
            f"{where} would lead to {path}, not into {root}; "
            "names used in paths must follow the name rule"
        )
    return path
