"""The panel served by uvicorn on a thread of its own (`callbot web`, and `callbot serve` with [web]
listen), the way the store's JSON API is (store/api.py ApiServer): the socket is bound before the
thread starts, so a port in use is an error at start, not a log line later."""
from __future__ import annotations

import os
import socket
import threading
import time

from callbot.store.call_store import CallStore
from callbot.web.app import create_app

SECRET_ENV = "CALLBOT_WEB_SECRET"  # signs session cookies; unset: a random one (sessions end with the process)


class WebServer:
    def __init__(self, store: CallStore, sock: socket.socket, secret: str | None):
        import uvicorn

        self.store = store
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(create_app(store, secret=secret), log_level="warning",
                                                    lifespan="off", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="web-panel",
                                       daemon=True)

    @classmethod
    def start(cls, url: str, host: str = "127.0.0.1", port: int = 8088, *, migrate_schema: bool = True,
              timeout: float = 10.0) -> WebServer:
        """Binds host:port and serves the panel over the store at `url` (migrated first: the users'
        tables are the panel's own)."""
        store = CallStore(url, migrate_schema=migrate_schema)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            store.close()
            raise
        web = cls(store, sock, os.environ.get(SECRET_ENV) or None)
        web.thread.start()
        deadline = time.monotonic() + timeout
        while not web.server.started:
            if not web.thread.is_alive() or time.monotonic() > deadline:
                web.stop()
                raise OSError(f"the web panel did not start on {host}:{port}")
            time.sleep(0.01)
        return web

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        self.sock.close()
        self.store.close()
