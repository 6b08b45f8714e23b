"""`callbot serve` with [web] listen: the web panel (callbot.web) over serve's call store, on a thread of
its own beside the SIP side, linked to the running server (app/web_link.py) for the live calls and
system pages (the panel reads the store, writes its own users and audit log, and controls live calls
only through the link)."""
from __future__ import annotations

from callbot.app.errors import StartupError
from callbot.app.settings import Settings


class ServeWeb:
    """The panel and its link to serve; `stop` ends the live streams first, so that uvicorn's graceful
    shutdown has no endless response to wait for."""

    def __init__(self, web, link, campaigns=None):
        self.web = web
        self.link = link
        self.campaigns = campaigns  # app/web_campaigns.py PanelCampaigns: its dialers stop with the panel
        self.host, self.port = web.host, web.port

    def stop(self) -> None:
        if self.link is not None:
            self.link.close()
        self.web.stop()
        if self.campaigns is not None:
            self.campaigns.close()


def start_web(settings: Settings, server=None, config: str | None = None, registry=None) -> ServeWeb | None:
    """The running panel (web/server.py WebServer, linked to `server`: app/serve.py Server; None: no live
    calls, as `callbot web`), or None without [web] listen; `config` (the settings' file) gives the panel's
    editor its bots (app/bot_config.py); `registry`: the store API's campaigns, shared (else its own)."""
    if settings.web.listen is None:
        return None
    if not settings.store.enabled:
        raise StartupError("[web] listen: the panel shows the call store: [store] enabled must be true")
    from callbot.store.database import StoreError
    from callbot.web.server import WebServer

    link = None
    if server is not None:
        from callbot.app.web_link import ServeWebLink

        link = ServeWebLink(server).start()
    host, port = settings.web.address
    try:
        from callbot.app.bot_config import BotConfig

        from callbot.app.web_campaigns import PanelCampaigns

        bots = BotConfig(config) if config else None
        campaigns = PanelCampaigns.of(settings, registry if registry is not None else getattr(server, "campaigns", None))
        return ServeWeb(WebServer.start(settings.store_url(), host, port, link=link, bots=bots, campaigns=campaigns),
                        link, campaigns)
    except (OSError, StoreError) as err:
        if link is not None:
            link.close()
        raise StartupError(f"[web] listen {settings.web.listen!r}: {err}") from None
