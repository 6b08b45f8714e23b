"""An ASGI app of the call store's readers (the JSON API, the web panel) served by uvicorn on a thread.

One piece for both because their needs are the same: the socket is bound before the thread starts, so
a port in use is an OSError at start, not a log line later; the start waits until uvicorn serves (or
gives up after a bound); stop ends the thread and closes the socket and the store the app reads.
uvicorn leaves the signals alone off the main thread, so `callbot serve` keeps its own.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from callbot.store.call_store import CallStore


class ThreadedAsgi:
    """`app` over `store`, served on `sock` by uvicorn on a thread named `name`."""

    def __init__(self, store: CallStore, sock: socket.socket, app: Any, name: str):
        import uvicorn

        self.store = store
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)

    @staticmethod
    def bind(store: CallStore, host: str, port: int) -> socket.socket:
        """A listening socket on host:port; on failure the store is closed and the OSError raised."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            store.close()
            raise
        return sock

    def run(self, what: str, timeout: float) -> None:
        """Starts the thread and waits until uvicorn serves; OSError naming `what` when it does not."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"{what} did not start on {self.host}:{self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        self.sock.close()
        self.store.close()
