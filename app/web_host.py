"""`callbot serve` with [web] listen: the web panel (callbot.web) over serve's call store, on a thread of
its own beside the SIP side (the panel only reads the store, and writes its own users and audit log)."""
from __future__ import annotations

from callbot.app.errors import StartupError
from callbot.app.settings import Settings


def start_web(settings: Settings, config: str | None = None):
    """The running panel (web/server.py WebServer), or None without [web] listen; `config` (the settings'
    file) gives the panel's editor its bots (app/bot_config.py)."""
    if settings.web.listen is None:
        return None
    if not settings.store.enabled:
        raise StartupError("[web] listen: the panel shows the call store: [store] enabled must be true")
    from callbot.store.database import StoreError
    from callbot.web.server import WebServer

    host, port = settings.web.address
    try:
        from callbot.app.bot_config import BotConfig

        return WebServer.start(settings.store_url(), host, port, bots=BotConfig(config) if config else None)
    except (OSError, StoreError) as err:
        raise StartupError(f"[web] listen {settings.web.listen!r}: {err}") from None
