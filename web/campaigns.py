"""The campaigns page (/campaigns): every outbound campaign with its progress (rows done of all, calls up,
attempts, outcomes), and pause / resume / stop for admins and supervisors.

What the panel needs of them is the `CampaignDesk` Protocol below, which the app implements over its
campaign registry (app/web_campaigns.py over app/campaign_api.py): the panel may not import the app (the
import contracts), and the registry's dialers are processes of their own, controlled through their
folders' control files, so the page works the same inside `callbot serve` and in `callbot web` alone.
Campaigns are started from the HTTP API or `callbot campaign run` (docs/campaigns.md).

Tenant scope, as everywhere in the panel: a campaign's tenant is its bot's; a user with a tenant sees and
controls only that tenant's campaigns, another's is a 404 (the same as one that does not exist). Every
action is audited (`campaign.pause`, `campaign.resume`, `campaign.stop`).
"""
from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from callbot.web.users import User

ACTIONS = ("pause", "resume", "stop")
ACTING_ROLES = ("admin", "supervisor")


class CampaignDeskError(Exception):
    """An action the registry refused (one line), with its HTTP status (404 no such campaign, 409 over)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class CampaignDesk(Protocol):
    def all(self) -> list[dict[str, Any]]:
        """Every campaign, newest first: id, bot, tenant, status (running, paused, stopping, finished,
        failed, ended), rows, started_at, progress {rows, done, attempts, up, by_outcome}."""
        ...

    def control(self, cid: str, action: str) -> dict[str, Any]:
        """Pause, resume or stop a campaign; CampaignDeskError if it cannot."""
        ...


def campaign_routes(desk: CampaignDesk | None, *, page, render, audit, error) -> list[Route]:
    """The page's routes for the panel's app (web/app.py): `page` wraps an endpoint (session, CSRF, role),
    `render(request, template, user, status, **context)`, `audit(user, source, action, target, detail)`,
    `error(status, text)` the panel's error."""

    def mine(user: User) -> list[dict[str, Any]]:
        return [c for c in desk.all() if user.sees_tenant(c.get("tenant"))] if desk is not None else []

    def listing(request: Request, user: User) -> Response:
        return render(request, "campaigns.html", user, campaigns=mine(user), desk=desk is not None,
                      act=user.role in ACTING_ROLES, done=request.query_params.get("done"))

    def act(request: Request, user: User) -> Response:
        cid, action = request.path_params["cid"], request.path_params["action"]
        if desk is None or action not in ACTIONS:
            raise error(404, "no such campaign action")
        if user.role not in ACTING_ROLES:
            raise error(403, "viewers cannot control campaigns")
        campaign = next((c for c in mine(user) if c["id"] == cid), None)
        if campaign is None:
            raise error(404, f"no campaign {cid!r}")
        try:
            desk.control(cid, action)
        except CampaignDeskError as err:
            raise error(err.status, f"cannot {action} campaign {cid}: {err}") from None
        audit(user.name, request.client.host if request.client else "?", f"campaign.{action}", cid,
              {"tenant": campaign.get("tenant"), "bot": campaign.get("bot")})
        return RedirectResponse(f"/campaigns?done={action}", status_code=303)

    return [
        Route("/campaigns", page(listing)),
        Route("/campaigns/{cid}/{action}", page(act), methods=["POST"]),
    ]
