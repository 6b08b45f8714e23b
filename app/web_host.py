"""`callbot serve` with [web] listen: the web panel (callbot.web) over serve's call store, on a thread of
its own beside the SIP side (the panel only reads the store, and writes its own users and audit log)."""
from __future__ import annotations

from callbot.app.errors import StartupError
from callbot.app.settings import Settings


def start_web(settings: Settings):
    """The running panel (web/server.py WebServer), or None without [web] listen."""
    if settings.web.listen is None:
        return None
    if not settings.store.enabled:
        raise StartupError("[web] listen: the panel shows the call store: [store] enabled must be true")
    from callbot.store.database import StoreError
    from callbot.web.server import WebServer

    host, port = settings.web.address
    try:
        return WebServer.start(settings.store_url(), host, port)
    except (OSError, StoreError) as err:
        raise StartupError(f"[web] listen {settings.web.listen!r}: {err}") from None
