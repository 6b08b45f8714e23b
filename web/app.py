"""The panel's pages as one Starlette app: sign-in, the call list, a call's page with its recording,
transcript, flow path, events, metrics, categories and scores, the dashboard, and (admins) users and the
audit log.

Every page but the sign-in needs a session (else a redirect to /login); the session cookie is signed
(itsdangerous via Starlette's SessionMiddleware), HttpOnly and SameSite=Lax; every POST carries the
session's CSRF token (web/security.py) or gets 403. Tenant scope is applied in one place per kind of
answer: listings and the dashboard get the user's tenant forced into their filter, and one call (its
page, recording and record) goes through `_call_for`, which answers 404 - not 403 - for a call of
another tenant, so a crafted URL cannot even learn that the call exists.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import secrets
import time
from typing import Callable
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from callbot.store import queries
from callbot.store.api import filter_of
from callbot.store.call_store import CallStore
from callbot.store.database import StoreError
from callbot.store.export import write_calls
from callbot.store.queries import QueryError
from callbot.store.retention import Selection, purge
from callbot.store.schema import calls
from callbot.web import charts, editor
from callbot.web.campaigns import CampaignDesk, campaign_routes
from callbot.web.dashboard import dashboard
from callbot.web.live import live_routes
from callbot.web.security import LoginLimiter, csrf_ok, csrf_token
from callbot.web.serve_link import ServeLink
from callbot.web.system import system_routes
from callbot.web.users import ROLES, User, UserError, Users, WrongPassword
from callbot.web.waveform import waveform_svg

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_SIZE = 50
EXPORT_LIMIT = queries.MAX_LIMIT  # calls in one CSV download (the newest the filters take)
SESSION_COOKIE = "callbot_panel"
SESSION_MAX_AGE_S = 8 * 3600
EVENTS_SHOWN = 500
# every script, style, image and sound from the panel itself (nothing inline, nothing from elsewhere): an
# injected <script> in a call's data would not run; no page of the panel inside another site's frame
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
LINE_GAP_MS = 1500.0  # a pause this long on a leg starts a new line of its transcript


class PanelError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def create_app(store: CallStore, *, secret: str | None = None, limiter: LoginLimiter | None = None,
               clock: Callable[[], float] = time.time, link: ServeLink | None = None,
               bots: editor.Bots | None = None, campaigns: CampaignDesk | None = None) -> Starlette:
    """The panel over `store`. `secret` signs the session cookies (None: a random one, so sessions end
    when the process does). `bots`: the config's bots for the editor (app/bot_config.py; None: no editor).
    `campaigns`: the outbound campaigns (web/campaigns.py; app/web_campaigns.py; None: the page says so)."""
    users = Users(store, clock=clock)
    limiter = limiter or LoginLimiter()
    templates = Jinja2Templates(directory=os.path.join(HERE, "templates"))
    templates.env.filters["iso"] = lambda t: (queries.iso(t) or "").replace("+00:00", "").replace("T", " ")
    templates.env.filters["num"] = _num
    templates.env.filters["clock"] = _clock

    def render(request: Request, name: str, user: User | None, status: int = 200, **context) -> Response:
        context.update(request=request, user=user, csrf=csrf_token(request.session))
        return templates.TemplateResponse(request, name, context, status_code=status)

    def page(fn, *, admin: bool = False):
        """A page that needs a signed-in user (an admin with `admin`); POSTs need the CSRF token."""
        async def endpoint(request: Request) -> Response:
            if request.method == "POST":
                form = await request.form()
                if not csrf_ok(request.session, form.get("csrf")):
                    return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
                request.state.form = form
            user = _signed_in(request, users)
            if user is None:
                if request.method == "GET":
                    return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
                return PlainTextResponse("sign in first", status_code=401)
            if admin and not user.is_admin:
                return PlainTextResponse("admins only", status_code=403)
            try:
                return await _run(fn, request, user)
            except PanelError as err:
                return render(request, "error.html", user, status=err.status, message=str(err))
            except QueryError as err:
                return render(request, "error.html", user, status=400, message=str(err))
            except (SQLAlchemyError, StoreError) as err:
                return render(request, "error.html", user, status=503, message=_store_trouble(request, err))
        return endpoint

    async def store_down(request: Request, err: Exception) -> Response:
        """The store failing outside a page's own work (the signed-in user read at each click, a sign-in,
        a sign-out): the same one-line 503, not a server error with a traceback."""
        return render(request, "error.html", None, status=503, message=_store_trouble(request, err))

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return render(request, "login.html", None, next=_safe_next(request.query_params.get("next")))
        form = await request.form()
        if not csrf_ok(request.session, form.get("csrf")):
            return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        source = request.client.host if request.client else "?"
        nxt = _safe_next(form.get("next"))
        if limiter.blocked(source, name):
            users.audit(None, source, "login.limited", name)
            return render(request, "login.html", None, status=429, next=nxt,
                          error="too many failed sign-ins: wait a few minutes")
        user = users.authenticate(name, password, source=source)
        if user is None:
            limiter.failed(source, name)
            return render(request, "login.html", None, status=401, next=nxt, error="wrong name or password")
        limiter.succeeded(name)
        request.session.clear()  # a new session (and CSRF token) at sign-in: no fixation
        request.session.update(user=user.name, stamp=user.stamp, csrf=secrets.token_urlsafe(32))
        return RedirectResponse(nxt, status_code=303)

    def logout(request: Request, user: User) -> Response:
        users.audit(user.name, _source(request), "logout")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    def call_list(request: Request, user: User) -> Response:
        params = request.query_params
        f = _scoped(filter_of(params, limit=PAGE_SIZE), user)
        with store.reading() as conn:
            rows = queries.list_calls(conn, f)
            total = queries.count_calls(conn, f)
            bots = _bots(conn, user)
        keep = {k: v for k, v in params.items() if k != "offset" and v}
        pages = {"prev": f.offset - PAGE_SIZE if f.offset > 0 else None,
                 "next": f.offset + PAGE_SIZE if f.offset + PAGE_SIZE < total else None}
        return render(request, "calls.html", user, calls=rows, total=total, f=f, params=params, bots=bots,
                      query=lambda off: "?" + urlencode({**keep, "offset": max(0, off)}), pages=pages,
                      erased=params.get("erased"), export="/export/calls.csv?" + urlencode(
                          {k: v for k, v in keep.items() if k != "erased"}), export_limit=EXPORT_LIMIT)

    def export_calls(request: Request, user: User) -> Response:
        """The calls the list's filters take, as CSV (store/export.py: what a spreadsheet would run as a
        formula is neutralised), within the user's tenant; at most EXPORT_LIMIT, newest first; audited."""
        params = request.query_params
        f = _scoped(filter_of({k: v for k, v in params.items() if k not in ("limit", "offset")},
                              limit=EXPORT_LIMIT), user)
        with store.reading() as conn:
            rows = queries.list_calls(conn, f)
        users.audit(user.name, _source(request), "export.calls", None,
                    {"filter": {k: v for k, v in params.items() if v and k not in ("limit", "offset")},
                     "calls": len(rows)})
        out = io.StringIO()
        write_calls(rows, "csv", out)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="calls-{stamp}.csv"'})

    def erase(request: Request, user: User) -> Response:
        """An admin erases a call on request (its recording, record, events and analysis; store/retention.py)."""
        call_id = request.path_params["call_id"]
        with store.reading() as conn:
            _call_for(conn, call_id, user)  # 404 for a call outside the admin's tenant
        if request.state.form.get("confirm") != "on":
            raise PanelError(400, "tick the box to confirm: erasing a call deletes its recording and its record "
                             "for good")
        report = purge([], store, Selection(call_ids=frozenset({call_id})))
        if report.going_on:
            raise PanelError(409, "this call is going on: it can be erased once it is over")
        users.audit(user.name, _source(request), "delete.call", call_id)
        if report.problems:
            raise PanelError(500, f"the call's record is erased, but not all its files: {'; '.join(report.problems)}")
        return RedirectResponse("/calls?" + urlencode({"erased": call_id}), status_code=303)

    def call_page(request: Request, user: User) -> Response:
        call_id = request.path_params["call_id"]
        with store.reading() as conn:
            _call_for(conn, call_id, user)
            detail = queries.call_detail(conn, call_id)
            events = queries.call_events(conn, call_id, limit=EVENTS_SHOWN) or []
        order = {"call": 0, "caller": 1, "bot": 2}
        detail["metrics"] = dict(sorted(detail["metrics"].items(), key=lambda kv: order.get(kv[0], 3)))
        c = detail["call"]
        recording = c.get("recording_path")
        has_audio = bool(recording) and os.path.isfile(recording)
        return render(request, "call.html", user, d=detail, c=c, events=events, has_audio=has_audio,
                      wave=waveform_svg(recording) if has_audio else None,
                      lines=_transcript_lines(detail["transcript"]), start_at=c.get("start_at") or 0,
                      quote=_quote)

    def recording(request: Request, user: User) -> Response:
        call_id = request.path_params["call_id"]
        with store.reading() as conn:
            c = _call_for(conn, call_id, user)
        path = c.recording_path
        if not path or not os.path.isfile(path):
            raise PanelError(404, "this call's recording is not on this machine")
        if "download" in request.query_params:  # the player's own range requests are not downloads
            users.audit(user.name, _source(request), "download.recording", call_id)
        return FileResponse(path, media_type="audio/wav", filename=os.path.basename(path),
                            content_disposition_type="attachment" if "download" in request.query_params else "inline")

    def record(request: Request, user: User) -> Response:
        call_id = request.path_params["call_id"]
        with store.reading() as conn:
            _call_for(conn, call_id, user)
            detail = queries.call_detail(conn, call_id)
            detail["events"] = queries.call_events(conn, call_id)
        users.audit(user.name, _source(request), "download.record", call_id)
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in call_id)[:100] + ".json"
        return Response(json.dumps(detail, indent=2), media_type="application/json",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    def dash(request: Request, user: User) -> Response:
        params = request.query_params
        f = _scoped(filter_of(params, limit=None), user)
        with store.reading() as conn:
            d = dashboard(conn, f)
            bots = _bots(conn, user)
        hours = _hours(d["per_hour"])
        return render(request, "dashboard.html", user, d=d, params=params, bots=bots,
                      per_hour=charts.bars(hours, label_every=max(1, len(hours) // 12)),
                      outcomes=charts.hbars(sorted(((k or "-"), v) for k, v in d["by_outcome"].items())),
                      categories=charts.hbars([(c["category"], c["calls"]) for c in d["categories"]]),
                      sentiment=charts.signed_bars([(s["day"], s["sentiment"]) for s in d["sentiment_by_day"]]))

    def users_page(request: Request, user: User, message: str | None = None, error: str | None = None) -> Response:
        if request.method == "POST" and message is None and error is None:
            form = request.state.form
            tenant = str(form.get("tenant") or "") or None
            try:
                if user.tenant is not None and tenant != user.tenant:
                    raise UserError(f"you add users of tenant {user.tenant} only")
                added = users.add(str(form.get("name", "")), str(form.get("role", "")), str(form.get("password", "")),
                                  tenant=tenant, by=user.name, source=_source(request))
                message = f"user {added.name} added ({added.role}, tenant {added.tenant or 'all'})"
            except UserError as err:
                error = str(err)
        shown = [u for u in users.all() if _manages(user, u)]
        return render(request, "users.html", user, status=400 if error else 200, users=shown, roles=ROLES,
                      message=message, error=error)

    def user_action(request: Request, user: User) -> Response:
        """An admin disables or enables a user, or sets their password (POST /users/NAME/ACTION)."""
        name, action = request.path_params["name"], request.path_params["action"]
        target = users.get(name)
        if target is None or not _manages(user, target):
            raise PanelError(404, f"no user {name!r}")
        form = request.state.form
        try:
            if action in ("disable", "enable"):
                if name == user.name and action == "disable":
                    raise UserError("you cannot disable yourself: another admin can")
                users.set_disabled(name, action == "disable", by=user.name, source=_source(request))
                message = f"user {name} {action}d"
            elif action == "password":
                changed = users.set_password(name, str(form.get("password", "")), by=user.name,
                                             source=_source(request))
                if name == user.name:  # this session stays signed in, the others are out
                    request.session["stamp"] = changed.stamp
                message = f"the password of {name} is set; their sessions are signed out"
            else:
                raise PanelError(404, f"no action {action!r}")
        except UserError as err:
            return users_page(request, user, error=str(err))
        return users_page(request, user, message=message)

    def account(request: Request, user: User) -> Response:
        """Every user's own page: their password, changed with the current one (limited as sign-ins are)."""
        message = error = None
        status = 200
        if request.method == "POST":
            form = request.state.form
            source = _source(request)
            new, again = str(form.get("password", "")), str(form.get("again", ""))
            if limiter.blocked(source, user.name):
                error, status = "too many wrong passwords: wait a few minutes", 429
            elif new != again:
                error, status = "the new passwords differ", 400
            else:
                try:
                    changed = users.set_password(user.name, new, by=user.name, source=source,
                                                 current=str(form.get("current", "")))
                    request.session["stamp"] = changed.stamp  # this session stays signed in, the others are out
                    limiter.succeeded(user.name)
                    message = "your password is changed; your other sessions are signed out"
                except UserError as err:
                    if isinstance(err, WrongPassword):
                        limiter.failed(source, user.name)
                    error, status = str(err), 400
        return render(request, "account.html", user, status=status, message=message, error=error)

    def audit_page(request: Request, user: User) -> Response:
        return render(request, "audit.html", user, entries=users.audit_entries())

    def home(request: Request, user: User) -> Response:
        return RedirectResponse("/calls", status_code=303)

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", page(logout), methods=["POST"]),
        Route("/", page(home)),
        Route("/calls", page(call_list)),
        Route("/export/calls.csv", page(export_calls)),  # not under /calls/: a Call-ID may be any text
        Route("/calls/{call_id:path}/recording", page(recording)),
        Route("/calls/{call_id:path}/record", page(record)),
        Route("/calls/{call_id:path}/delete", page(erase, admin=True), methods=["POST"]),
        Route("/calls/{call_id:path}", page(call_page)),
        Route("/dashboard", page(dash)),
        # `link`: the running `callbot serve` (web/serve_link.py), for the live calls and system pages; None
        # (`callbot web`): those pages say that serve is not attached
        *live_routes(link, page=page, render=render, users=users, error=PanelError),  # web/live.py
        *system_routes(link, store, page=page, render=render, error=PanelError),  # web/system.py
        Route("/users", page(users_page, admin=True), methods=["GET", "POST"]),
        Route("/users/{name}/{action}", page(user_action, admin=True), methods=["POST"]),
        Route("/account", page(account), methods=["GET", "POST"]),
        Route("/audit", page(audit_page, admin=True)),
        *editor.routes(page, render, users.audit, bots, PanelError),  # web/editor.py: admins' bots and flows
        *campaign_routes(campaigns, page=page, render=render, audit=users.audit, error=PanelError),
        Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=secret or secrets.token_urlsafe(32),
                             session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_S, same_site="lax",
                             https_only=False)]
    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders), *middleware],
                     exception_handlers={SQLAlchemyError: store_down, StoreError: store_down})


def _store_trouble(request: Request, err: Exception) -> str:
    """The line a user reads when the store failed under a request (logged once, without a traceback):
    what could not be done and the database's own first line (SQLAlchemy's text adds the statement and
    a link)."""
    doing = "read" if request.method in ("GET", "HEAD") else "written"  # a POST changes the store
    cause = getattr(err, "orig", None) or err
    line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    log.warning("%s %s: the store cannot be %s: %s", request.method, request.url.path, doing, line)
    return f"the store cannot be {doing}: {line}"


class _SecurityHeaders:
    """SECURITY_HEADERS on every response (plain ASGI: no buffering of the recordings' bodies)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _run(fn, request: Request, user: User) -> Response:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, request, user)  # the store's queries block: off the event loop


def _signed_in(request: Request, users: Users) -> User | None:
    name = request.session.get("user")
    if not name:
        return None
    user = users.get(name)  # read each time: a disabled user, or one whose password changed, is out at the next click
    if user is None or user.disabled or request.session.get("stamp") != user.stamp:
        return None
    return user


def _manages(admin: User, other: User) -> bool:
    """Whether an admin may see and change `other`: an admin of every tenant, anyone; an admin of one
    tenant, that tenant's users only."""
    return admin.tenant is None or other.tenant == admin.tenant


def _scoped(f: queries.CallFilter, user: User) -> queries.CallFilter:
    """The filter with the user's tenant forced in (a scoped user asking for another tenant gets none)."""
    if user.tenant is None:
        return f
    fields = {k: getattr(f, k) for k in f.__struct_fields__}
    if fields["tenant"] not in (None, user.tenant):
        fields["tenant"] = "\x00no tenant\x00"
    else:
        fields["tenant"] = user.tenant
    return queries.CallFilter(**fields)


def _bots(conn, user: User) -> list[str]:
    """The bots of the calls the user may see (the filters' choices)."""
    q = select(calls.c.bot).where(calls.c.bot.is_not(None)).distinct().order_by(calls.c.bot)
    if user.tenant is not None:
        q = q.where(calls.c.tenant == user.tenant)
    return list(conn.execute(q).scalars())


def _call_for(conn, call_id: str, user: User):
    """The call's row if the user may see it; PanelError 404 alike for no such call and another tenant's."""
    row = conn.execute(select(calls.c.call_id, calls.c.tenant, calls.c.recording_path)
                       .where(calls.c.call_id == call_id)).first()
    if row is None or not user.sees_tenant(row.tenant):
        raise PanelError(404, "no such call")
    return row


def _hours(per_hour: list[dict], most: int = 48) -> list[tuple[str, float]]:
    """The last `most` hours up to the newest with calls, hours without calls as 0 (the store lists only
    hours with calls)."""
    if not per_hour:
        return []
    counts = {datetime.datetime.fromisoformat(h["hour"]).timestamp(): h["calls"] for h in per_hour}
    last = max(counts)
    first = max(min(counts), last - (most - 1) * 3600)
    out = []
    t = first
    while t <= last:
        label = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H") + "h"
        out.append((label, counts.get(t, 0)))
        t += 3600
    return out


def _transcript_lines(t: dict) -> list[dict]:
    """Lines of the transcript in time order: the analysis's words (each clickable to its time), a new
    line where the leg changes or pauses LINE_GAP_MS; without an analysis, the live words and bot text."""
    lines: list[dict] = []
    if t["words"]:
        for w in sorted(t["words"], key=lambda w: w["start_ms"]):
            last = lines[-1] if lines else None
            if last is None or last["leg"] != w["leg"] or w["start_ms"] - last["end_ms"] > LINE_GAP_MS:
                last = {"leg": w["leg"], "start_ms": w["start_ms"], "end_ms": w["end_ms"], "words": []}
                lines.append(last)
            last["words"].append({"t_ms": w["start_ms"], "text": w["text"], "redacted": w.get("redacted")})
            last["end_ms"] = max(last["end_ms"], w["end_ms"])
        return lines
    for piece in t["live"]:
        t_ms = piece.get("t_ms") or 0.0
        last = lines[-1] if lines else None
        if last is None or last["leg"] != piece["leg"] or t_ms - last["end_ms"] > LINE_GAP_MS:
            last = {"leg": piece["leg"], "start_ms": t_ms, "end_ms": t_ms, "words": []}
            lines.append(last)
        last["words"].append({"t_ms": t_ms, "text": piece["text"].strip(), "redacted": False})
        last["end_ms"] = t_ms
    return lines


def _safe_next(value) -> str:
    """Where to go after sign-in: a path of this site only (no open redirect)."""
    value = str(value or "")
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else "/calls"


def _source(request: Request) -> str:
    return request.client.host if request.client else "?"


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.{digits}f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _clock(ms) -> str:
    s = (ms or 0) / 1000.0
    return f"{int(s // 60)}:{s % 60:04.1f}"


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
