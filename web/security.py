"""What keeps the panel's sign-in and forms safe: CSRF tokens and the sign-in rate limit.

CSRF: every session (signed-in or not) carries a random token; every POST must send it back in its form
(`csrf`), compared in constant time, else 403. The session cookie is SameSite=Lax too, but that alone
leaves top-level cross-site POSTs from old browsers and same-site subdomains open.

Sign-in rate limit: failed sign-ins are counted per source address and per user name over a sliding
window; beyond the limit a sign-in is refused (429) before the password is even checked, so guessing a
password costs hours, not seconds. In memory: one process serves the panel, and a restart forgetting a
few minutes of failures is harmless. The clock is injected (tests).
"""
from __future__ import annotations

import collections
import hmac
import secrets
import threading
import time
from typing import Callable

CSRF_KEY = "csrf"


def csrf_token(session: dict) -> str:
    """The session's CSRF token (made on first use)."""
    token = session.get(CSRF_KEY)
    if not token:
        token = session[CSRF_KEY] = secrets.token_urlsafe(32)
    return token


def csrf_ok(session: dict, sent: str | None) -> bool:
    token = session.get(CSRF_KEY)
    return bool(token) and bool(sent) and hmac.compare_digest(str(token), str(sent))


class LoginLimiter:
    """At most `failures` failed sign-ins per user name and `source_failures` per source address (several
    people behind one NAT share it) within `window_s`."""

    def __init__(self, failures: int = 5, source_failures: int = 20, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.source_failures = source_failures
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str) -> collections.deque[float]:
        q = self._seen.setdefault(key, collections.deque())
        cut = self.clock() - self.window_s
        while q and q[0] < cut:
            q.popleft()
        return q

    def blocked(self, source: str, name: str) -> bool:
        with self._lock:
            return (len(self._recent(f"user:{name}")) >= self.failures
                    or len(self._recent(f"src:{source}")) >= self.source_failures)

    def failed(self, source: str, name: str) -> None:
        with self._lock:
            for k in (f"src:{source}", f"user:{name}"):
                self._recent(k).append(self.clock())
            if len(self._seen) > 100_000:  # a flood of names: forget the quiet ones
                for k in [k for k, q in self._seen.items() if not q]:
                    del self._seen[k]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._seen.pop(f"user:{name}", None)
