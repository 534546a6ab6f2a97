"""Bearer tokens and the roles they grant.

A token is ``hwt_<id>_<secret>``: the id names it (in lists, revocations and the
audit log) and is not secret; the secret is 32 random bytes. The master keeps
only the SHA-256 of the whole token, so its store never holds a usable token.
SHA-256 (not a slow password hash) is enough for 256 random bits: there is
nothing to guess.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ROLES = ("admin", "viewer")

# What each role may call on the master, by gRPC method name. A viewer's upgrade
# or rollback must be a dry run (checked with the request, see hotwire.master.access).
VIEWER_METHODS = frozenset(
    {"Status", "History", "Diff", "ListWorkers", "ListTokens", "Audit", "Upgrade", "Rollback"}
)
DRY_RUN_ONLY = frozenset({"Upgrade", "Rollback"})
MUTATING = frozenset(
    {"Submit", "Upgrade", "Rollback", "Kill", "Canary", "CreateToken", "RevokeToken"}
)


class TokenError(Exception):
    pass


def new_token() -> tuple[str, str]:
    """(id, token) of a fresh token."""
    tid = secrets.token_hex(4)
    return tid, f"hwt_{tid}_{secrets.token_urlsafe(32)}"


def token_id(token: str) -> str:
    """The id part of a token; TokenError if it does not look like one."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "hwt" or not parts[1] or not parts[2]:
        raise TokenError("not a hotwire token")
    return parts[1]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def matches(token: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(token), stored_digest)


def allowed(role: str, method: str, dry_run: bool) -> bool:
    if role == "admin":
        return True
    if role == "viewer" and method in VIEWER_METHODS:
        return dry_run or method not in DRY_RUN_ONLY
    return False
