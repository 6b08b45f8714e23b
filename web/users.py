"""The panel's users and its audit log, kept in the call store (tables `users`, `audit_log`).

Passwords are hashed with argon2id (argon2-cffi, the Password Hashing Competition's winner, with its
maintained defaults) and never stored or logged. A user has a role (admin: everything, users too;
supervisor: every page of its scope; viewer: reads its scope) and a tenant scope: None sees every
tenant, a name sees only that tenant's calls and recordings. There is no default user and no default
password: the first admin is made with `callbot users add NAME --role admin`.

Every change (a user added, disabled, a password set; sign-ins and their failures) is one row of the
audit log, written in the same transaction as the change, so the log cannot miss one that happened.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, insert, select, update

from callbot.store.call_store import CallStore
from callbot.store.schema import audit_log, users

ROLES = ("admin", "supervisor", "viewer")
MIN_PASSWORD = 10
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

_hasher = PasswordHasher()
# verified against when the name is unknown, so that a wrong name costs as long as a wrong password
_DUMMY_HASH = _hasher.hash("no such user: the time of a real check")


class UserError(ValueError):
    """A user that cannot be made or changed as asked (one line)."""


class User(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    tenant: str | None = None
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def sees_tenant(self, tenant: str | None) -> bool:
        """Whether this user may see a call of `tenant` (None: a call with no tenant: only unscoped users)."""
        return self.tenant is None or tenant == self.tenant


def check_new_user(name: str, role: str, password: str) -> None:
    if not _NAME.fullmatch(name):
        raise UserError(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    if role not in ROLES:
        raise UserError(f"role {role!r}: one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")


class Users:
    """The users and audit log of one store; `clock` gives unix seconds (injected in tests)."""

    def __init__(self, store: CallStore, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock

    def add(self, name: str, role: str, password: str, *, tenant: str | None = None, by: str | None = None,
            source: str = "cli") -> User:
        check_new_user(name, role, password)
        with self.store.engine.begin() as conn:
            if conn.execute(select(users.c.name).where(users.c.name == name)).first() is not None:
                raise UserError(f"user {name!r} exists already")
            conn.execute(insert(users).values(name=name, password_hash=_hasher.hash(password), role=role,
                                              tenant=tenant, created_at=self.clock(), disabled=False))
            self._audit(conn, by, source, "user.add", name, {"role": role, "tenant": tenant})
        return User(name=name, role=role, tenant=tenant)

    def set_disabled(self, name: str, disabled: bool, *, by: str | None, source: str) -> None:
        with self.store.engine.begin() as conn:
            done = conn.execute(update(users).where(users.c.name == name).values(disabled=disabled)).rowcount
            if not done:
                raise UserError(f"no user {name!r}")
            self._audit(conn, by, source, "user.disable" if disabled else "user.enable", name, {})

    def get(self, name: str) -> User | None:
        with self.store.reading() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        return None if row is None else _user(row)

    def all(self) -> list[User]:
        with self.store.reading() as conn:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.name))]

    def authenticate(self, name: str, password: str, *, source: str) -> User | None:
        """The user if the password is theirs (and they are not disabled), else None; either way one row
        of the audit log (login / login.failed)."""
        with self.store.reading() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        ok = False
        try:
            ok = _hasher.verify(row.password_hash if row is not None else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            ok = False
        ok = ok and row is not None and not row.disabled
        self.audit(name if row is not None else None, source, "login" if ok else "login.failed",
                   name, {} if row is not None else {"unknown": True})
        if ok and _hasher.check_needs_rehash(row.password_hash):  # argon2's parameters moved on since
            with self.store.engine.begin() as conn:
                conn.execute(update(users).where(users.c.name == name).values(password_hash=_hasher.hash(password)))
        return _user(row) if ok else None

    def audit(self, user: str | None, source: str | None, action: str, target: str | None = None,
              detail: dict | None = None) -> None:
        with self.store.engine.begin() as conn:
            self._audit(conn, user, source, action, target, detail or {})

    def _audit(self, conn: Connection, user, source, action, target, detail) -> None:
        conn.execute(insert(audit_log).values(t=self.clock(), user=user, source=source, action=action,
                                              target=target, detail=detail))

    def audit_entries(self, limit: int = 200) -> list[dict]:
        with self.store.reading() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(audit_log).order_by(audit_log.c.id.desc()).limit(limit))]


def _user(row) -> User:
    return User(name=row.name, role=row.role, tenant=row.tenant, disabled=bool(row.disabled))
