"""The panel's users and its audit log, kept in the call store (tables `users`, `audit_log`).

Passwords are hashed with argon2id (argon2-cffi, the Password Hashing Competition's winner, with its
maintained defaults) and never stored or logged. A user has a role (admin: everything, users too;
supervisor: every page of its scope; viewer: reads its scope) and a tenant scope: None sees every
tenant, a name sees only that tenant's calls and recordings. There is no default user and no default
password: the first admin is made with `callbot users add NAME --role admin`.

Every change (a user added, disabled, a password set; sign-ins and their failures) is one row of the
audit log, written in the same transaction as the change, so the log cannot miss one that happened. A
password changed signs out every session of that user made before (the session keeps a stamp of the
password's hash); a disabled user is out at the next click.
"""
from __future__ import annotations

import hashlib
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


class WrongPassword(UserError):
    """The current password given for a change is not the user's."""


class User(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    tenant: str | None = None
    disabled: bool = False
    # a short digest of the password's hash, kept in the session at sign-in: a session whose stamp is no
    # longer the user's (the password changed since) is signed out at its next click
    stamp: str = ""

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
        """Disable (signed out at the next click, sign-ins refused) or enable a user. The last enabled
        admin is not disabled: nobody could then manage the users but from the command line."""
        with self.store.engine.begin() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
            if row is None:
                raise UserError(f"no user {name!r}")
            if disabled and row.role == "admin" and not row.disabled:
                admins = conn.execute(select(users.c.name).where(users.c.role == "admin", users.c.disabled.is_(False),
                                                                 users.c.name != name)).first()
                if admins is None:
                    raise UserError(f"{name!r} is the last enabled admin: add or enable another admin first")
            conn.execute(update(users).where(users.c.name == name).values(disabled=disabled))
            self._audit(conn, by, source, "user.disable" if disabled else "user.enable", name, {})

    def set_password(self, name: str, password: str, *, by: str | None, source: str,
                     current: str | None = None) -> User:
        """A new password for `name`, set by an admin (`current` None) or by the user, who gives the current
        one (UserError when it is wrong). Every session of the user signed in before is signed out (the
        stamp changes); returns the user with the new stamp, for the session that made the change."""
        if len(password) < MIN_PASSWORD:
            raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
        with self.store.engine.begin() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
            if row is None:
                raise UserError(f"no user {name!r}")
            if current is not None and not _verifies(row.password_hash, current):
                raise WrongPassword("the current password is wrong")
            new_hash = _hasher.hash(password)
            conn.execute(update(users).where(users.c.name == name).values(password_hash=new_hash))
            self._audit(conn, by, source, "user.password", name, {"own": current is not None})
        return msgspec.structs.replace(_user(row), stamp=_stamp(new_hash))

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
        ok = _verifies(row.password_hash if row is not None else _DUMMY_HASH, password)
        ok = ok and row is not None and not row.disabled
        self.audit(name if row is not None else None, source, "login" if ok else "login.failed",
                   name, {} if row is not None else {"unknown": True})
        if ok and _hasher.check_needs_rehash(row.password_hash):  # argon2's parameters moved on since
            rehashed = _hasher.hash(password)
            with self.store.engine.begin() as conn:
                conn.execute(update(users).where(users.c.name == name).values(password_hash=rehashed))
            return msgspec.structs.replace(_user(row), stamp=_stamp(rehashed))
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


def _verifies(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _stamp(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _user(row) -> User:
    return User(name=row.name, role=row.role, tenant=row.tenant, disabled=bool(row.disabled),
                stamp=_stamp(row.password_hash))
