"""API keys: random tokens shown once; only their sha256 is stored.

The tokens carry 256 bits of entropy, so a fast unsalted hash is enough (no password hashing).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.models import ApiKey, User

KEY_PREFIX = "mipp_"


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key(session: Session, user: User) -> str:
    """Create a key for `user` and return the token (the only time it is visible)."""
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(user=user, prefix=token[:12], key_hash=hash_key(token)))
    return token


def create_user(session: Session, name: str, *, is_admin: bool = False) -> tuple[User, str]:
    """Create a user with one API key; raise ValueError when the name is taken."""
    name = name.strip()
    if not name:
        raise ValueError("user name must not be empty")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ValueError(f"a user named {name!r} already exists")
    user = User(name=name, is_admin=is_admin)
    session.add(user)
    token = new_api_key(session, user)
    session.flush()
    return user, token


# Built once: every request runs it, and building the statement (and its cache key) cost
# as much as executing it. Rows: (User, the key's id).
USER_FOR_KEY = (
    select(User, ApiKey.id)
    .join(ApiKey, ApiKey.user_id == User.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked.is_(False))
)


@dataclass(frozen=True)
class Caller:
    """The user of a key as the hot reads need it (app.deps.read_as_caller): what the
    ownership checks and the rate limit read, without an ORM instance."""

    id: str
    name: str
    is_admin: bool
    requests_per_minute: int | None


# Rows: the Caller's fields, then the key's id; read on a bare connection (no session). A
# loader may add its own columns to read them in the same round trip (app.deps.viewed_job).
CALLER_FOR_KEY = (
    select(User.id, User.name, User.is_admin, User.requests_per_minute, ApiKey.id)
    .join(ApiKey, ApiKey.user_id == User.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked.is_(False))
)


def caller_of(row) -> tuple[Caller, str] | None:
    """(Caller, key id) from a row that starts with CALLER_FOR_KEY's columns; None for no row
    or a row whose key columns are NULL."""
    if row is None or row[0] is None:
        return None
    return Caller(*row[:4]), row[4]


def user_for_key(session: Session, token: str) -> tuple[User, str] | None:
    """(the user, the key's id) of an unrevoked key, in one query (every request pays for
    it); None for an unknown or revoked key."""
    row = session.execute(USER_FOR_KEY, {"key_hash": hash_key(token)}).first()
    return None if row is None else (row[0], row[1])


def find_key(session: Session, ref: str) -> ApiKey | None:
    """A key by its id or by its visible prefix (what `mipp admin keys` prints); raises
    ValueError when a prefix names several keys."""
    key = session.get(ApiKey, ref)
    if key is not None:
        return key
    matches = session.scalars(select(ApiKey).where(ApiKey.prefix == ref)).all()
    if len(matches) > 1:
        raise ValueError(f"prefix {ref!r} names {len(matches)} keys; give the key id")
    return matches[0] if matches else None


def revoke_key(session: Session, key: ApiKey) -> bool:
    """Revoke a key (the next request with it answers 401); False if it already was."""
    if key.revoked:
        return False
    key.revoked = True
    session.flush()
    return True
