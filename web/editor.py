"""The bots and flows editor (issue 16 point 5): admins edit a bot's settings and its flow file in the page.

Who: admins only (the panel's `page(..., admin=True)`: a supervisor or viewer gets 403 for every page and
POST here); an admin with a tenant sees and edits only that tenant's bots, and another tenant's bot
answers 404 like a bot that does not exist, crafted URL or not. Every POST carries the CSRF token.

What a save does: the flow text is checked with the very code of `callbot flows check`
(flows/schema.py `parse_flow_file`), and its error is shown word for word with the line of the file it
points at (flows/toml_lines.py) marked in the numbered copy beside the text box; a text that fails is
never written. A good one is written atomically, the previous file kept as `.bak`, refused when the file
changed on disk since the page loaded it (flows/file_save.py); the audit log gets who, which bot, the
file's digests before and after and a unified diff. `callbot serve` takes the saved flow at the next call
(app/flow_reload.py); calls in progress keep theirs. The bot's settings go through the app's BotConfig
(app/bot_config.py: tomlkit edits that keep the file's comments, serve's own checks before writing).

Why the app hands the panel a `BotConfig` object instead of the panel reading the config: the settings'
checks reach the engine's voices and the SIP side's types, which this package may not import
(pyproject.toml's import contracts). The panel only calls the small protocol below.
"""
from __future__ import annotations

import difflib
from typing import Callable, Protocol

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from callbot.flows.file_save import ChangedOnDisk, SaveError, digest, save_flow
from callbot.flows.schema import Flow, FlowError, parse_flow_file
from callbot.flows.toml_lines import error_line
from callbot.web.flow_graph import flow_svg

DIFF_KEPT = 8000  # characters of a save's diff kept in the audit log


class Bots(Protocol):
    """What the editor needs of the config (app/bot_config.py BotConfig)."""

    voices: tuple[str, ...]
    restart_note: str

    def bots(self) -> list[dict]: ...

    def update_bot(self, name: str, fields: dict[str, str], dids: dict[int, str], *, loaded: str | None,
                   tenant: str | None = None) -> tuple[list[str], str | None, int | None]: ...


def routes(page: Callable, render: Callable, audit: Callable, bots: Bots | None, error: type) -> list[Route]:
    """The editor's routes for the panel's app (web/app.py): `page` wraps an endpoint (session, CSRF,
    role), `render` a template, `audit(user, source, action, target, detail)` logs, `error(status, text)`
    is the panel's error page exception."""

    def config() -> Bots:
        if bots is None:
            raise error(404, "no config file: start the panel as `callbot web --config FILE` (or from `callbot "
                             "serve` with [web] listen) to edit its bots")
        return bots

    def visible(user) -> list[dict]:
        try:
            listed = config().bots()
        except ValueError as err:  # the config on disk does not pass its checks (ConfigError)
            raise error(503, str(err)) from None
        return [b for b in listed if user.sees_tenant(b["tenant"])]

    def bot_for(user, name: str) -> dict:
        found = next((b for b in visible(user) if b["name"] == name), None)
        if found is None:  # another tenant's bot reads as no bot at all
            raise error(404, "no such bot")
        return found

    def bot_list(request: Request, user) -> Response:
        return render(request, "bots.html", user, bots=visible(user))

    def bot_page(request: Request, user, *, status: int = 200, flow_text: str | None = None,
                 flow_error: str | None = None, flow_line: int | None = None, flow_message: str | None = None,
                 flow_loaded: str | None = None, settings_error: str | None = None, settings_line: int | None = None,
                 settings_message: str | None = None, form: dict | None = None) -> Response:
        bot = bot_for(user, request.path_params["name"])
        text = flow_text
        on_disk = None
        if bot["flow"] is not None:
            try:
                with open(bot["flow"], "rb") as f:
                    on_disk = f.read()
            except OSError as err:
                flow_error = flow_error or f"{bot['flow']}: cannot read the flow file ({err.strerror})"
        if text is None and on_disk is not None:
            text = on_disk.decode("utf-8", "replace")
        graph = None
        if text is not None and bot["flow"] is not None:
            graph = _graph(text, bot["flow"])
            if graph is None and on_disk is not None:  # the text fails: draw the file as it is on disk
                graph = _graph(on_disk, bot["flow"])
        lines = (text or "").split("\n")
        return render(request, "bot.html", user, status=status, bot=bot, voices=_voice_choices(config(), bot),
                      flow_text=text, lines=lines, flow_error=flow_error, flow_line=flow_line,
                      flow_message=flow_message, graph=graph,
                      flow_loaded=flow_loaded or (digest(on_disk) if on_disk is not None else ""),
                      settings_error=settings_error, settings_line=settings_line,
                      settings_message=settings_message, restart_note=config().restart_note, form=form or {})

    def get_bot(request: Request, user) -> Response:
        return bot_page(request, user)

    def post_flow(request: Request, user) -> Response:
        bot = bot_for(user, request.path_params["name"])
        if bot["flow"] is None:
            raise error(400, f"bot {bot['name']!r} has no flow file (add `flow = \"...\"` to its [[bots]] entry)")
        form = request.state.form
        text = str(form.get("text", "")).replace("\r\n", "\n")
        loaded = str(form.get("loaded", "")) or None
        action = str(form.get("action", "save"))
        path = bot["flow"]
        try:
            if action == "check":
                flow = parse_flow_file(text, path)
                return bot_page(request, user, flow_text=text, flow_loaded=loaded,
                                flow_message=f"{path}: ok ({len(flow.states)} states, starts at {flow.start!r}); "
                                             "not saved")
            before = _read(path)
            flow, after = save_flow(path, text, loaded=loaded)
        except FlowError as err:
            return bot_page(request, user, status=400, flow_text=text, flow_loaded=loaded, flow_error=str(err),
                            flow_line=error_line(text, str(err)))
        except ChangedOnDisk as err:
            return bot_page(request, user, status=409, flow_text=text, flow_loaded=loaded, flow_error=str(err))
        except SaveError as err:
            return bot_page(request, user, status=500, flow_text=text, flow_loaded=loaded, flow_error=str(err))
        diff = "".join(difflib.unified_diff((before or b"").decode("utf-8", "replace").splitlines(True),
                                            text.splitlines(True), "before", "after"))
        audit(user.name, _source(request), "flow.save", bot["name"],
              {"file": path, "before": digest(before) if before is not None else None, "after": after,
               "diff": diff[:DIFF_KEPT]})
        return bot_page(request, user, flow_loaded=after,
                        flow_message=f"saved {path} ({len(flow.states)} states): the next call follows it; "
                                     "calls in progress keep the flow they started with")

    def post_settings(request: Request, user) -> Response:
        bot = bot_for(user, request.path_params["name"])
        form = request.state.form
        fields = {k: str(form[k]) for k in ("voice", "persona", "language", "text_temperature", "text_top_k",
                                            "audio_temperature", "audio_top_k") if k in form}
        if "voice" in fields and fields["voice"] not in _voice_choices(config(), bot):
            return bot_page(request, user, status=400, form=fields,
                            settings_error=f"voice {fields['voice']!r}: one of the named voices (a voice file is "
                                           "set in the config)")
        dids = {}
        for key in form.keys():
            if key.startswith("did-") and key[4:].isdigit():
                dids[int(key[4:])] = str(form[key])
        changed, problem, line = config().update_bot(bot["name"], fields, dids,
                                                     loaded=str(form.get("loaded", "")) or None, tenant=user.tenant)
        if problem is not None:
            return bot_page(request, user, status=400, settings_error=problem, settings_line=line, form=fields)
        if changed:
            audit(user.name, _source(request), "bot.settings", bot["name"],
                  {"changed": changed, **{k: fields[k] for k in fields if k in changed},
                   **{f"routes[{j}].did": dids[j] for j in dids if f"routes[{j}].did" in changed}})
        message = f"saved: {', '.join(changed)} ({config().restart_note})" if changed else "nothing changed"
        return bot_page(request, user, settings_message=message)

    return [
        Route("/bots", page(bot_list, admin=True)),
        Route("/bots/{name}", page(get_bot, admin=True)),
        Route("/bots/{name}/flow", page(post_flow, admin=True), methods=["POST"]),
        Route("/bots/{name}/settings", page(post_settings, admin=True), methods=["POST"]),
    ]


def _graph(text: str | bytes, path: str) -> Markup | None:
    try:
        flow: Flow = parse_flow_file(text, path)
    except FlowError:
        return None
    return flow_svg(flow)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _voice_choices(bots: Bots, bot: dict) -> list[str]:
    """The named voices, and the bot's own when it is a file (an admin of the config put it there; the
    page offers no other path: a voice file is chosen in the config, not uploaded)."""
    voices = list(bots.voices)
    return voices if bot["voice"] in voices else [bot["voice"], *voices]


def _source(request: Request) -> str:
    return request.client.host if request.client else "?"

