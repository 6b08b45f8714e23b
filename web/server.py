"""The panel served by uvicorn on a thread of its own (`callbot web`, and `callbot serve` with [web]
listen), as the store's JSON API is: store/asgi_thread.py."""
from __future__ import annotations

import os

from callbot.store.asgi_thread import ThreadedAsgi
from callbot.store.call_store import CallStore
from callbot.web.app import create_app

SECRET_ENV = "CALLBOT_WEB_SECRET"  # signs session cookies; unset: a random one (sessions end with the process)


class WebServer(ThreadedAsgi):
    @classmethod
    def start(cls, url: str, host: str = "127.0.0.1", port: int = 8088, *, migrate_schema: bool = True,
              timeout: float = 10.0, link=None, bots=None, campaigns=None) -> WebServer:
        """Binds host:port and serves the panel over the store at `url` (migrated first: the users'
        tables are the panel's own); `link` (web/serve_link.py ServeLink): the running serve, for the live
        calls and system pages; `bots`: the config's bots for the editor (app/bot_config.py); `campaigns`:
        the outbound campaigns (web/campaigns.py CampaignDesk)."""
        store = CallStore(url, migrate_schema=migrate_schema)
        sock = cls.bind(store, host, port)
        web = cls(store, sock, create_app(store, secret=os.environ.get(SECRET_ENV) or None, link=link, bots=bots,
                                            campaigns=campaigns),
                  "web-panel")
        web.run("the web panel", timeout)
        return web
