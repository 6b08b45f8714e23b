"""The web panel's small rules, without a browser: the sign-in limit's window on an injected clock, where
a sign-in may send the user next, a scoped user's filter, users' names, roles and password length (on SQLite and PostgreSQL)."""
from __future__ import annotations

import pytest

from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from callbot.store.queries import CallFilter
from callbot.web.app import _safe_next, _scoped
from callbot.web.security import LoginLimiter, csrf_ok, csrf_token
from callbot.web.users import User, UserError, Users


def test_the_sign_in_limit_counts_failures_per_name_and_source_within_its_window():
    now = [1000.0]
    limiter = LoginLimiter(failures=3, source_failures=5, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert not limiter.blocked("10.0.0.1", "ada")
        limiter.failed("10.0.0.1", "ada")
    assert limiter.blocked("10.0.0.1", "ada") and limiter.blocked("10.0.0.9", "ada")  # the name, from anywhere
    assert not limiter.blocked("10.0.0.1", "bob")  # 3 of the source's 5
    limiter.failed("10.0.0.1", "bob"), limiter.failed("10.0.0.1", "cy")
    assert limiter.blocked("10.0.0.1", "dan") and not limiter.blocked("10.0.0.2", "dan")
    now[0] += 61  # the window has passed
    assert not limiter.blocked("10.0.0.1", "ada")


def test_csrf_tokens_and_next_paths():
    session: dict = {}
    token = csrf_token(session)
    assert csrf_token(session) == token and csrf_ok(session, token)
    assert not csrf_ok(session, None) and not csrf_ok(session, token + "x") and not csrf_ok({}, token)
    assert _safe_next("/calls/x?y=1") == "/calls/x?y=1"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "", None, "calls"):
        assert _safe_next(bad) == "/calls"


def test_a_scoped_users_filter_holds_its_tenant():
    vic = User(name="vic", role="viewer", tenant="acme")
    assert _scoped(CallFilter(), vic).tenant == "acme"
    assert _scoped(CallFilter(tenant="beta"), vic).tenant not in ("beta", None)
    assert _scoped(CallFilter(tenant="beta"), User(name="ada", role="admin")).tenant == "beta"
    assert not vic.sees_tenant("beta") and not vic.sees_tenant(None) and vic.sees_tenant("acme")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "calls.db")
    return request.getfixturevalue("postgres_server").new_database()


def test_users_are_checked_hashed_and_audited(store_url):
    with CallStore(store_url) as store:
        users = Users(store, clock=lambda: 1796270000.0)
        for name, role, pw in (("", "admin", "x" * 12), ("a b", "admin", "x" * 12), ("ada", "root", "x" * 12),
                               ("ada", "admin", "short")):
            with pytest.raises(UserError):
                users.add(name, role, pw)
        users.add("ada", "supervisor", "long-enough-1")  # not an admin: the last admin is never disabled
        with pytest.raises(UserError, match="exists already"):
            users.add("ada", "viewer", "long-enough-2")
        with store.reading() as conn:
            stored = conn.exec_driver_sql("SELECT password_hash FROM users").scalar_one()
        assert stored.startswith("$argon2id$") and "long-enough-1" not in stored
        signed = users.authenticate("ada", "long-enough-1", source="t")
        assert (signed.name, signed.role, signed.tenant) == ("ada", "supervisor", None) and len(signed.stamp) == 16
        assert users.authenticate("ada", "wrong", source="t") is None
        assert users.authenticate("nobody", "wrong", source="t") is None
        users.set_disabled("ada", True, by=None, source="t")
        assert users.authenticate("ada", "long-enough-1", source="t") is None
        actions = [e["action"] for e in users.audit_entries()][::-1]
        assert actions == ["user.add", "login", "login.failed", "login.failed", "user.disable", "login.failed"]


def test_a_password_changed_changes_the_stamp_and_the_last_admin_stays_enabled(store_url):
    with CallStore(store_url) as store:
        users = Users(store, clock=lambda: 1796270000.0)
        users.add("ada", "admin", "long-enough-1")
        users.add("vic", "viewer", "long-enough-2", tenant="acme")
        before = users.get("vic").stamp
        with pytest.raises(UserError, match="current password is wrong"):
            users.set_password("vic", "long-enough-3", by="vic", source="t", current="not-it-at-all")
        with pytest.raises(UserError, match="at least 10"):
            users.set_password("vic", "short", by="ada", source="t")
        with pytest.raises(UserError, match="no user"):
            users.set_password("nobody", "long-enough-3", by="ada", source="t")
        assert users.get("vic").stamp == before  # nothing changed by the refusals
        changed = users.set_password("vic", "long-enough-3", by="vic", source="t", current="long-enough-2")
        assert changed.stamp == users.get("vic").stamp != before
        assert users.authenticate("vic", "long-enough-2", source="t") is None
        assert users.authenticate("vic", "long-enough-3", source="t").stamp == changed.stamp
        reset = users.set_password("vic", "long-enough-4", by="ada", source="t")  # an admin's reset
        assert reset.stamp != changed.stamp
        with pytest.raises(UserError, match="last enabled admin"):
            users.set_disabled("ada", True, by=None, source="t")
        users.add("bea", "admin", "long-enough-5")
        users.set_disabled("ada", True, by="bea", source="t")  # another admin is there now
        with pytest.raises(UserError, match="last enabled admin"):
            users.set_disabled("bea", True, by=None, source="t")
        users.set_disabled("vic", True, by="bea", source="t")  # not an admin: always
        entries = [(e["action"], e["target"], e["detail"]) for e in users.audit_entries()][::-1]
        assert [e for e in entries if e[0] == "user.password"] == [("user.password", "vic", {"own": True}),
                                                                    ("user.password", "vic", {"own": False})]


def test_callbot_users_add_list_disable(tmp_path, capsys, monkeypatch):
    from callbot.app.cli import main

    url = sqlite_url(tmp_path / "calls.db")
    monkeypatch.setenv("PW", "long-enough-1")
    assert main(["users", "add", "vic", "--role", "viewer", "--tenant", "acme", "--password-env", "PW",
                 "--store", url]) == 0
    assert main(["users", "add", "vic", "--role", "viewer", "--password-env", "PW", "--store", url]) == 2
    assert "user 'vic' exists already" in capsys.readouterr().err
    assert main(["users", "add", "bob", "--role", "viewer", "--password-env", "UNSET_VAR", "--store", url]) == 2
    assert "UNSET_VAR is not set" in capsys.readouterr().err
    assert main(["users", "disable", "vic", "--store", url]) == 0
    assert main(["users", "disable", "nobody", "--store", url]) == 2
    capsys.readouterr()
    assert main(["users", "list", "--store", url]) == 0
    assert capsys.readouterr().out.strip() == "vic  viewer  acme  disabled"
    monkeypatch.setenv("PW2", "long-enough-2")
    assert main(["users", "password", "vic", "--password-env", "PW2", "--store", url]) == 0
    assert "password set" in capsys.readouterr().out
    assert main(["users", "password", "nobody", "--password-env", "PW2", "--store", url]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
