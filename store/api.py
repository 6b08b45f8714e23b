"""The call store as a JSON HTTP API: what `callbot calls list/show` answer, for the web panel to mount.

    GET /api/calls?since=&until=&bot=&tenant=&outcome=&category=&min_score=&max_score=&text=&complete=&limit=&offset=
    GET /api/calls/{call_id}             the call whole (store/queries.py call_detail)
    GET /api/calls/{call_id}/events      its events, each as its events-file line
    GET /api/calls/{call_id}/transcript  its turns, words and live words
    GET /api/stats?<the same filters>    counts by outcome, by bot, per hour

An ASGI app (Starlette) served by uvicorn: `create_app` is what the panel mounts; `ApiServer` runs it
on a thread of its own (`callbot serve` with [store] api, `callbot calls api`). Read-only, and bound to
127.0.0.1 unless told otherwise: call records hold phone numbers and what callers said. A bad filter is
a 400 with {"error": "..."}; an unknown call a 404; a store that cannot be read a 503.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from callbot.store import queries
from callbot.store.call_store import CallStore
from callbot.store.database import StoreError
from callbot.store.queries import CallFilter, QueryError

_FILTER_TEXT = ("bot", "tenant", "outcome", "category", "text")
_FILTER_NUMBER = ("min_score", "max_score")


def filter_of(params, *, limit: int | None = queries.LIST_LIMIT) -> CallFilter:
    """A CallFilter from query parameters (QueryError for one that does not read)."""
    args: dict = {k: params[k] for k in _FILTER_TEXT if params.get(k)}
    for k in ("since", "until"):
        if params.get(k):
            args[k] = queries.parse_time(params[k])
    for k in _FILTER_NUMBER:
        if params.get(k):
            try:
                args[k] = float(params[k])
            except ValueError:
                raise QueryError(f"{k}: {params[k]!r} is not a number") from None
    if params.get("complete"):
        if params["complete"] not in ("true", "false"):
            raise QueryError(f"complete: {params['complete']!r} is not true or false")
        args["complete"] = params["complete"] == "true"
    for k, default in (("limit", limit), ("offset", 0)):
        if params.get(k):
            try:
                args[k] = int(params[k])
            except ValueError:
                raise QueryError(f"{k}: {params[k]!r} is not a whole number") from None
        elif k == "limit":
            args[k] = default
    return CallFilter(**args)


def create_app(store: CallStore, routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The API over `store` (its own connections; sync handlers run on Starlette's thread pool). `routes`:
    more routes the app mounts beside the store's (the app's campaigns, app/campaign_api.py: the store
    knows nothing of them)."""

    def answer(fn):
        def endpoint(request: Request):
            try:
                with store.reading() as conn:
                    return fn(request, conn)
            except QueryError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            except (SQLAlchemyError, StoreError) as err:
                return JSONResponse({"error": f"the store cannot be read: {_one_line(err)}"}, status_code=503)
        return endpoint

    def list_calls(request, conn):
        f = filter_of(request.query_params)
        return JSONResponse({"calls": queries.list_calls(conn, f), "total": queries.count_calls(conn, f),
                             "limit": f.limit, "offset": f.offset})

    def one_call(request, conn):
        found = queries.call_detail(conn, request.path_params["call_id"])
        return _found(found)

    def call_events(request, conn):
        found = queries.call_events(conn, request.path_params["call_id"])
        return _found(None if found is None else {"events": found})

    def call_transcript(request, conn):
        call_id = request.path_params["call_id"]
        if queries.call_events(conn, call_id, limit=1) is None:
            return _found(None)
        return JSONResponse(queries.call_transcript(conn, call_id))

    def stats(request, conn):
        return JSONResponse(queries.stats(conn, filter_of(request.query_params, limit=None)))

    return Starlette(routes=[
        Route("/api/calls", answer(list_calls)),
        Route("/api/calls/{call_id:path}/events", answer(call_events)),
        Route("/api/calls/{call_id:path}/transcript", answer(call_transcript)),
        Route("/api/calls/{call_id:path}", answer(one_call)),
        Route("/api/stats", answer(stats)),
        *routes,
    ])


def _found(data: dict | None) -> JSONResponse:
    if data is None:
        return JSONResponse({"error": "no such call"}, status_code=404)
    return JSONResponse(data)


class ApiServer:
    """uvicorn serving the API on a thread; `stop` ends it. The socket is bound before the thread starts,
    so a port in use is an OSError at `start`, not a log line later. (uvicorn leaves the signals alone
    off the main thread: `callbot serve` keeps its own.)"""

    def __init__(self, store: CallStore, sock: socket.socket, routes: Sequence[BaseRoute] = ()):
        import uvicorn

        self.store = store
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(create_app(store, routes), log_level="warning", lifespan="off",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="store-api",
                                       daemon=True)

    @classmethod
    def start(cls, url: str, host: str = "127.0.0.1", port: int = 8091, timeout: float = 10.0,
              routes: Sequence[BaseRoute] = ()) -> ApiServer:
        """Binds host:port and serves the store at `url` (opened without migrating: the writer does that),
        with `routes` beside the store's."""
        store = CallStore(url, migrate_schema=False)
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
        api = cls(store, sock, routes)
        api.thread.start()
        deadline = time.monotonic() + timeout
        while not api.server.started:
            if not api.thread.is_alive() or time.monotonic() > deadline:
                api.stop()
                raise OSError(f"the API did not start on {host}:{port}")
            time.sleep(0.01)
        return api

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        self.sock.close()
        self.store.close()


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
