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

from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from callbot.store import queries
from callbot.store.asgi_thread import ThreadedAsgi
from callbot.store.call_store import CallStore
from callbot.store.database import StoreError
from callbot.store.queries import CallFilter, QueryError

_FILTER_TEXT = ("bot", "tenant", "outcome", "category", "text", "number")
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


class ApiServer(ThreadedAsgi):
    """uvicorn serving the API on a thread (store/asgi_thread.py); `stop` ends it."""

    @classmethod
    def start(cls, url: str, host: str = "127.0.0.1", port: int = 8091, timeout: float = 10.0,
              routes: Sequence[BaseRoute] = ()) -> ApiServer:
        """Binds host:port and serves the store at `url` (opened without migrating: the writer does that),
        with `routes` beside the store's."""
        store = CallStore(url, migrate_schema=False)
        api = cls(store, cls.bind(store, host, port), create_app(store, routes), "store-api")
        api.run("the API", timeout)
        return api


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
