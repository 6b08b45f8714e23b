"""The live calls page (/live): the calls in progress of a running `callbot serve`, their transcript as
it is said, who is speaking, their flow state, and for admins and supervisors hang-up, transfer (blind,
or attended: the target called first, the caller sent only once it answers) and listening in (the call's
audio as it is recorded, /live/ID/listen: ListenStream).

The page is rendered whole on the server (it reads without a script), then web/static/live.js keeps it
current from /live/events, a server-sent event stream: one `snapshot` of the user's calls, then every
change as it happens (web/serve_link.py lists them). Why SSE and not a WebSocket: the flow is one way,
it is plain HTTP through the same session cookie and CSP, and the browser reconnects by itself.

A stream is bounded: MAX_STREAMS_PER_USER per user and MAX_STREAMS in all (beyond: 429), its queue holds
QUEUE updates (a browser that falls behind gets a fresh snapshot instead of the ones it lost), it ends
when the browser goes (a disconnect is noticed at once, not at the next write), when the user is
disabled (checked every KEEPALIVE_S), and when serve stops (the link's `None`), so a stream never keeps
serve from shutting down.

Tenant scope, as everywhere in the panel: a user with a tenant gets only that tenant's calls and updates,
and a call of another tenant is a 404 on its actions too (the same answer as a call that is not there).
Roles: viewers read; a viewer's POST is a 403 whatever the call. Every action is in the audit log.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from callbot.web.serve_link import LinkError, LiveCallView, ServeLink, Update, sse, tenant_of
from callbot.web.users import User

ACTING_ROLES = ("admin", "supervisor")
MAX_STREAMS_PER_USER = 4  # tabs of one person
MAX_STREAMS = 64  # the process
QUEUE = 1024  # updates waiting for one browser
LISTEN_QUEUE = 20  # ~2 s of a call's audio waiting for a listening browser
LISTEN_CHECK_S = 1.0  # a listening stream looks this often whether its call is still going on
KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the stream, and a disabled user is noticed
# a SIP or tel URI, nothing a header could be smuggled in with
TRANSFER_TARGET = re.compile(r"(sips?:[^\s<>\"']{1,250}|tel:\+?[0-9().\- ]{1,40})")


def can_act(user: User) -> bool:
    return user.role in ACTING_ROLES


class Streams:
    """How many live streams each user has open (the caps above)."""

    def __init__(self, per_user: int = MAX_STREAMS_PER_USER, total: int = MAX_STREAMS):
        self.per_user = per_user
        self.total = total
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, name: str) -> bool:
        with self._lock:
            if sum(self._open.values()) >= self.total or self._open.get(name, 0) >= self.per_user:
                return False
            self._open[name] = self._open.get(name, 0) + 1
            return True

    def release(self, name: str) -> None:
        with self._lock:
            n = self._open.get(name, 0) - 1
            if n > 0:
                self._open[name] = n
            else:
                self._open.pop(name, None)

    def count(self, name: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if name is None else self._open.get(name, 0)


def visible(link: ServeLink, user: User) -> list[LiveCallView]:
    return [c for c in link.calls() if user.sees_tenant(c.tenant)]


def snapshot(link: ServeLink, user: User) -> Update:
    return {"type": "snapshot", "now": time.time(), "calls": [msgspec.to_builtins(c) for c in visible(link, user)]}


class _CappedStream:
    """A raw ASGI streaming response that counts against its user's and the process's stream caps
    (Streams): one more than they allow is a 429 before anything starts."""

    user: User
    streams: Streams

    async def __call__(self, scope, receive, send) -> None:
        if not self.streams.reserve(self.user.name):
            await PlainTextResponse("too many live streams open: close another tab", status_code=429)(
                scope, receive, send)
            return
        try:
            await self._stream(scope, receive, send)
        finally:
            self.streams.release(self.user.name)

    async def _stream(self, scope, receive, send) -> None:
        raise NotImplementedError


class LiveStream(_CappedStream):
    """The ASGI response of /live/events for one user (raw ASGI: it must see the browser go while it
    waits for the next update, which a StreamingResponse notices only when it writes)."""

    def __init__(self, link: ServeLink, user: User, streams: Streams,
                 still_allowed: Callable[[], Awaitable[bool]], keepalive_s: float = KEEPALIVE_S, queue: int = QUEUE):
        self.link = link
        self.user = user
        self.streams = streams
        self.still_allowed = still_allowed
        self.keepalive_s = keepalive_s
        self.queue = queue

    async def _stream(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(self.queue)
        lost = False

        def put(update: Update | None) -> None:  # on the loop
            nonlocal lost
            if update is None:  # serve is stopping: this one gets through, whatever else is waiting
                while queue.full():
                    queue.get_nowait()
            try:
                queue.put_nowait(update)
            except asyncio.QueueFull:
                lost = True

        feed = self.link.subscribe(lambda u: loop.call_soon_threadsafe(put, u))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]})
            await _body(send, sse(snapshot(self.link, self.user)))
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, gone}, timeout=self.keepalive_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    getter.cancel()
                    return
                if getter not in done:
                    getter.cancel()
                    if not await self.still_allowed():
                        break
                    await _body(send, sse(comment="keep-alive"))
                    continue
                update = getter.result()
                if update is None:  # serve is stopping
                    break
                if lost:  # fell behind: what was lost is in a fresh snapshot
                    lost = False
                    while not queue.empty():
                        if queue.get_nowait() is None:
                            return await _end(send)
                    await _body(send, sse(snapshot(self.link, self.user)))
                    continue
                if self.user.sees_tenant(tenant_of(update)):
                    await _body(send, sse(update))
            await _end(send)
        except OSError:  # the browser went while we wrote (uvicorn's ClientDisconnected)
            return
        finally:
            gone.cancel()
            feed.close()


class ListenStream(_CappedStream):
    """The ASGI response of /live/{id}/listen: the call's audio as it is recorded (both legs mixed,
    16-bit little-endian mono, `x-sample-rate` says the rate), for a supervisor listening in. Raw ASGI,
    as LiveStream: it ends when the browser goes, when the call ends (checked each LISTEN_CHECK_S), when
    the user may no longer act on it, or when serve stops. Audio the browser does not take fast enough is
    dropped, oldest first (LISTEN_QUEUE pieces of ~100 ms), never held for it on serve's recorder."""

    def __init__(self, link: ServeLink, call_id: str, still_allowed: Callable[[], Awaitable[bool]],
                 streams: Streams, user: User, check_s: float = LISTEN_CHECK_S):
        self.link = link
        self.call_id = call_id
        self.still_allowed = still_allowed
        self.streams = streams
        self.user = user
        self.check_s = check_s

    async def _stream(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(LISTEN_QUEUE)

        def put(pcm: bytes) -> None:  # on the loop
            if queue.full():
                queue.get_nowait()  # the oldest goes: a listener hears now, not a growing delay
            queue.put_nowait(pcm)

        from starlette.concurrency import run_in_threadpool

        def deliver(pcm: bytes) -> None:  # serve's recorder thread
            try:
                loop.call_soon_threadsafe(put, pcm)
            except RuntimeError:  # the loop has closed (the panel stopping) before the tap was removed
                pass

        try:  # off the event loop: the tap waits for the recorder's lock, held while it writes files
            rate, stop = await run_in_threadpool(self.link.listen, self.call_id, deliver)
        except LinkError as err:
            await PlainTextResponse(f"cannot listen: {err}", status_code=409)(scope, receive, send)
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", f"audio/L16;rate={rate};channels=1".encode()), (b"x-sample-rate", str(rate).encode()),
                (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]})
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, gone}, timeout=self.check_s, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    getter.cancel()
                    return
                if getter not in done:
                    getter.cancel()
                    if not any(c.call_id == self.call_id for c in self.link.calls()) or not await self.still_allowed():
                        break
                    continue
                await send({"type": "http.response.body", "body": getter.result(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the browser went while we wrote
            return
        finally:
            gone.cancel()
            loop.run_in_executor(None, stop)  # the recorder's lock again: not on the loop, not awaited


async def _disconnected(receive) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server could not say: take it as gone
        return


async def _body(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _end(send) -> None:
    await _body(send, sse({"type": "closed"}))
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def live_routes(link: ServeLink | None, *, page, render, users, error) -> list[Route]:
    """/live, /live/events and the actions, wrapped by the panel's `page` (sign-in, CSRF on POST);
    `render(request, template, user, status, **context)`, `users` (web/users.py Users: audit, get) and
    `error` (PanelError(status, text)) are the panel's."""
    streams = Streams()

    def live_page(request: Request, user: User) -> Response:
        if link is None:
            return render(request, "live.html", user, serve=False, calls=[])
        return render(request, "live.html", user, serve=True, calls=visible(link, user), act=can_act(user),
                      now=time.time())

    def allowed_still(user: User) -> Callable[[], Awaitable[bool]]:
        """Whether a stream's user is still the one it started for: enabled, same role and scope, same
        password (a changed one signs the user's other sessions out, open streams included)."""
        async def still_allowed() -> bool:
            from starlette.concurrency import run_in_threadpool

            try:
                now = await run_in_threadpool(users.get, user.name)
            except Exception:  # the store cannot say (gone, locked): end; the browser reconnects and is asked again
                return False
            return (now is not None and not now.disabled and now.role == user.role and now.tenant == user.tenant
                    and now.stamp == user.stamp)

        return still_allowed

    def events(request: Request, user: User):
        if link is None:
            raise error(404, "live calls need `callbot serve` with [web] listen")
        return LiveStream(link, user, streams, allowed_still(user))

    def listen(request: Request, user: User):
        """A supervisor listens in (admins and supervisors; audited as call.listen)."""
        call = call_for(request, user)
        users.audit(user.name, _source(request), "call.listen", call.call_id, {"tenant": call.tenant, "bot": call.bot})
        return ListenStream(link, call.call_id, allowed_still(user), streams, user)

    def call_for(request: Request, user: User) -> LiveCallView:
        """The call to act on: viewers are refused (403) whatever the call; a call not in progress or of
        another tenant is 404 alike."""
        if link is None:
            raise error(404, "live calls need `callbot serve` with [web] listen")
        if not can_act(user):
            raise error(403, "viewers cannot act on calls")
        call_id = request.path_params["call_id"]
        call = next((c for c in link.calls() if c.call_id == call_id), None)
        if call is None or not user.sees_tenant(call.tenant):
            raise error(404, "no such call in progress")
        return call

    def hangup(request: Request, user: User) -> Response:
        call = call_for(request, user)
        try:
            link.hangup(call.call_id)
        except LinkError as err:
            raise error(409, f"cannot hang up: {err}") from None
        users.audit(user.name, _source(request), "call.hangup", call.call_id, {"tenant": call.tenant, "bot": call.bot})
        return RedirectResponse("/live", status_code=303)

    def transfer(request: Request, user: User) -> Response:
        call = call_for(request, user)
        target = str(request.state.form.get("target", "")).strip()
        if not TRANSFER_TARGET.fullmatch(target):
            raise error(400, f"transfer to {target[:80]!r}: give a SIP URI (sip:agent@pbx.example.com) or tel:+number")
        attended = request.state.form.get("attended") == "on"  # the target called first
        try:
            link.transfer(call.call_id, target, attended=attended)
        except LinkError as err:
            raise error(409, f"cannot transfer: {err}") from None
        users.audit(user.name, _source(request), "call.transfer", call.call_id,
                    {"tenant": call.tenant, "bot": call.bot, "target": target,
                     "mode": "attended" if attended else "blind"})
        return RedirectResponse("/live", status_code=303)

    return [
        Route("/live", page(live_page)),
        Route("/live/events", page(events)),
        Route("/live/{call_id:path}/hangup", page(hangup), methods=["POST"]),
        Route("/live/{call_id:path}/transfer", page(transfer), methods=["POST"]),
        Route("/live/{call_id:path}/listen", page(listen)),
    ]


def _source(request: Request) -> str:
    return request.client.host if request.client else "?"
