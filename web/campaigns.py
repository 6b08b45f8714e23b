"""The campaigns page (/campaigns): every outbound campaign with its progress (rows done of all, calls up,
attempts, outcomes), and pause / resume / stop for admins and supervisors.

What the panel needs of them is the `CampaignDesk` Protocol below, which the app implements over its
campaign registry (app/web_campaigns.py over app/campaign_api.py): the panel may not import the app (the
import contracts), and the registry's dialers are processes of their own, controlled through their
folders' control files, so the page works the same inside `callbot serve` and in `callbot web` alone.

Admins and supervisors start one from the page: a contact list (CSV, as `callbot campaign run` reads
it), the campaign file's TOML (a sensible one filled in), a bot of their tenant, and whether it waits
paused; the registry checks both files before any dialer starts, and its one-line error is shown. The
HTTP API and `callbot campaign run` start them too (README, "Campaigns").

Tenant scope, as everywhere in the panel: a campaign's tenant is its bot's; a user with a tenant sees and
controls only that tenant's campaigns, another's is a 404 (the same as one that does not exist). Every
action is audited (`campaign.start`, `campaign.pause`, `campaign.resume`, `campaign.stop`).
"""
from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from callbot.web.users import User

ACTIONS = ("pause", "resume", "stop")
LIST_MAX = 20 * 1024 * 1024  # bytes of a contact list: some 200 000 rows, as the HTTP API takes
# what the page's campaign box holds at first: every key has a default (campaigns/config.py)
DEFAULT_CAMPAIGN = """max_concurrent = 2            # calls at once
calls_per_second = 1
max_call_s = 600                  # an answered call is hung up after this
timezone = "UTC"                  # rows without a tz column
[window]
hours = "09:00-20:00"             # in each callee's own time zone
days = ["mon", "tue", "wed", "thu", "fri"]
[amd]
enabled = true                    # answering machines detected (on_machine = "hangup" or "message")
"""
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

    def bots(self) -> list[tuple[str, str | None]]:
        """The bots a campaign may call with, and their tenants."""
        ...

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a campaign: {"list_csv", "campaign_toml", "bot", "paused"}, as the HTTP API takes it;
        CampaignDeskError (400 with the file's one line, 507 the disk) if it cannot."""
        ...


def campaign_routes(desk: CampaignDesk | None, *, page, render, audit, error) -> list[Route]:
    """The page's routes for the panel's app (web/app.py): `page` wraps an endpoint (session, CSRF, role),
    `render(request, template, user, status, **context)`, `audit(user, source, action, target, detail)`,
    `error(status, text)` the panel's error."""

    def mine(user: User) -> list[dict[str, Any]]:
        return [c for c in desk.all() if user.sees_tenant(c.get("tenant"))] if desk is not None else []

    def bots_for(user: User) -> list[str]:
        return [name for name, tenant in desk.bots() if user.sees_tenant(tenant)] if desk is not None else []

    def listing(request: Request, user: User, error_text: str | None = None, status: int = 200,
                form: dict | None = None) -> Response:
        return render(request, "campaigns.html", user, status=status, campaigns=mine(user), desk=desk is not None,
                      act=user.role in ACTING_ROLES, done=request.query_params.get("done"),
                      started=request.query_params.get("started"), bots=bots_for(user), error=error_text,
                      form=form or {"campaign": DEFAULT_CAMPAIGN})

    def start(request: Request, user: User) -> Response:
        """A campaign started from the page (multipart: the list file, the campaign TOML, bot, paused)."""
        if desk is None:
            raise error(404, "no campaigns folder")
        if user.role not in ACTING_ROLES:
            raise error(403, "viewers cannot start campaigns")
        form = request.state.form
        bot = str(form.get("bot") or "")
        campaign = str(form.get("campaign") or "")
        kept = {"campaign": campaign, "bot": bot, "paused": form.get("paused") == "on"}
        if bot not in bots_for(user):
            return listing(request, user, f"bot {bot!r}: not a bot of yours", 400, kept)
        upload = form.get("list")
        data = upload.file.read(LIST_MAX + 1) if hasattr(upload, "file") else b""
        if not data:
            return listing(request, user, "choose the contact list (a CSV file)", 400, kept)
        if len(data) > LIST_MAX:
            return listing(request, user, f"the contact list is over {LIST_MAX // (1024 * 1024)} MB", 413, kept)
        try:
            text = data.decode("utf-8-sig")  # a spreadsheet's CSV often starts with a byte-order mark
        except UnicodeDecodeError:
            return listing(request, user, "the contact list is not UTF-8 text: save it as CSV UTF-8", 400, kept)
        try:
            started = desk.start({"list_csv": text, "campaign_toml": campaign, "bot": bot,
                                  "paused": kept["paused"]})
        except CampaignDeskError as err:
            return listing(request, user, str(err), err.status, kept)
        audit(user.name, request.client.host if request.client else "?", "campaign.start", started["id"],
              {"bot": bot, "rows": started.get("rows"), "paused": kept["paused"],
               "list": getattr(upload, "filename", None)})
        return RedirectResponse(f"/campaigns?started={started['id']}", status_code=303)

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
        Route("/campaigns/start", page(start), methods=["POST"]),
        Route("/campaigns/{cid}/{action}", page(act), methods=["POST"]),
    ]
