"""The system page (/system, admins and supervisors): what the running `callbot serve` is made of and how
it does: the engine and model (weights, quantization, KV cache bits), slots used of the capacity, step
time per batch size, workers, SIP accounts and their registration, the event bus's subscribers, and
where Prometheus scrapes it. Read from the ServeLink (web/serve_link.py: app/web_link.py builds the
dict) when the panel runs inside serve; with `callbot web` alone, what the store knows and a line
saying that serve is not attached.
"""
from __future__ import annotations

from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from callbot.store.call_store import CallStore
from callbot.store.schema import calls
from callbot.web.serve_link import ServeLink
from callbot.web.users import User

VIEWING_ROLES = ("admin", "supervisor")


def store_summary(store: CallStore, user: User) -> dict:
    """The store's side: its database, the user's calls in all, still open (no end written yet), the
    newest, and the bots seen."""
    scope = [calls.c.tenant == user.tenant] if user.tenant is not None else []
    with store.reading() as conn:
        total, newest = conn.execute(select(func.count(), func.max(calls.c.start_at)).where(*scope)).one()
        open_ = conn.execute(select(func.count()).where(*scope, calls.c.complete.is_(False))).scalar_one()
        bots = list(conn.execute(select(calls.c.bot).where(*scope, calls.c.bot.is_not(None)).distinct()
                                 .order_by(calls.c.bot)).scalars())
    return {"dialect": store.dialect, "calls": total, "open": open_, "newest": newest, "bots": bots}


def system_routes(link: ServeLink | None, store: CallStore, *, page, render, error) -> list[Route]:
    def system_page(request: Request, user: User) -> Response:
        if user.role not in VIEWING_ROLES:
            raise error(403, "the system page is for admins and supervisors")
        s = link.system() if link is not None else None
        return render(request, "system.html", user, s=s, store=store_summary(store, user))

    return [Route("/system", page(system_page))]
