"""The bots of a `callbot serve` config file, read and edited for the panel's editor (web/editor.py).

Why here, in the app: the settings' checks (app/settings.py) reach the engine's voice list and the SIP
side's account types, which the panel's package may not import (pyproject.toml's import contracts); the
app builds a `BotConfig` over the config file and hands it to the panel, which asks it for plain dicts
and error strings only.

Why tomlkit: an admin's config file has comments, an order and a layout that are theirs; tomlkit
edits the values in place and writes everything else back as it was. An edit is checked first with the
checks serve runs at start (`parse_settings`; the accounts' `password_env` are not read: the panel may
run as `callbot web` without serve's environment), then written atomically with the previous file kept
as `.bak` (flows/file_save.py). A change that fails the check is never written: the error comes back
worded as serve would print it, with its line.

What an edit changes for `callbot serve`: a bot's flow file is picked up by the next call
(app/flow_reload.py), the routes by the next INVITE, and a changed voice, persona or sampling has the
model prepare the bot again, once, for the calls that start after it is ready (app/bot_reload.py);
language and context are read at serve's start and take effect at its next restart. The editor says
so on the page.
"""
from __future__ import annotations

import os
import pathlib

import msgspec
import tomlkit

from callbot.app.routes import normalize_number
from callbot.app.settings import BotSettings, ConfigError, Settings, parse_settings
from callbot.engine.model.voices import VOICES
from callbot.flows.file_save import SaveError, digest, save_text
from callbot.flows.toml_lines import error_line

SAMPLING_FIELDS = {"text_temperature": float, "text_top_k": int, "audio_temperature": float, "audio_top_k": int}
TEXT_FIELDS = ("voice", "persona", "language")
RESTART_NOTE = ("a saved flow file and the routes' numbers are taken by the next call; a new voice, persona or "
                "sampling is prepared once by the model, in the background, and taken by the calls that start "
                "after it is ready (calls in progress keep theirs); language takes effect when `callbot serve` "
                "starts again")


class BotConfig:
    """The config file at `path`; every method reads it again (serve, a text editor or another admin may
    have changed it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).resolve()
        self.voices = tuple(VOICES)
        self.restart_note = RESTART_NOTE

    def _read(self) -> tuple[str, Settings]:
        try:
            text = self.path.read_text()
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot read the config file ({err.strerror})") from None
        try:
            return text, parse_settings(text, base_dir=self.path.parent, resolve_secrets=False)
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {err}") from None

    def _read_leniently(self) -> tuple[str, Settings, str | None]:
        """The config as `_read` gives it, or when it fails serve's checks (a flow file broken by hand, a
        rules file missing), as its types alone decode it, with that failure: the editor must still open
        the bots, or a broken flow file could not be fixed from the page. A file that does not even decode
        is the ConfigError."""
        try:
            text, settings = self._read()
            return text, settings, None
        except ConfigError as err:
            problem = str(err)
        try:
            text = self.path.read_text()
            settings = msgspec.toml.decode(text, type=Settings)
        except (OSError, msgspec.MsgspecError):
            raise ConfigError(problem) from None
        bots = tuple(msgspec.structs.replace(b, flow=os.fspath(self.path.parent / os.path.expanduser(b.flow)))
                     if b.flow else b for b in settings.bots)
        return text, msgspec.structs.replace(settings, bots=bots), problem

    def bots(self) -> list[dict]:
        """Every bot as a dict: name, tenant, voice, persona, language, sampling, flow (absolute path or
        None), flow_shown (as the file writes it), routes (index, name, dids), digest (of the file),
        problem (why the config fails serve's checks now, else None)."""
        text, settings, problem = self._read_leniently()
        raw = tomlkit.parse(text)
        raw_bots = raw.get("bots") or []
        out = []
        for i, bot in enumerate(settings.bots):
            routes = [{"index": j, "name": r.name or f"routes[{j}]",
                       "dids": [] if r.did is None else ([r.did] if isinstance(r.did, str) else list(r.did))}
                      for j, r in enumerate(settings.routes) if r.bot == bot.name]
            shown = raw_bots[i].get("flow") if i < len(raw_bots) else None
            out.append({"name": bot.name, "tenant": bot.tenant, "voice": _shown_voice(bot, raw_bots, i),
                        "persona": bot.persona, "language": bot.language,
                        "sampling": {k: getattr(bot.sampling, k) for k in SAMPLING_FIELDS},
                        "flow": bot.flow, "flow_shown": str(shown) if shown is not None else None,
                        "routes": routes, "digest": digest(text), "problem": problem})
        return out

    def bot(self, name: str) -> dict | None:
        return next((b for b in self.bots() if b["name"] == name), None)

    def update_bot(self, name: str, fields: dict[str, str], dids: dict[int, str], *, loaded: str | None,
                   tenant: str | None = None) -> tuple[list[str], str | None, int | None]:
        """Apply the form's `fields` (voice, persona, language, the sampling numbers) and `dids` (route index
        -> numbers, comma-separated) to bot `name`, check, save. `tenant`: the editing admin's scope (its
        routes may not take a number another tenant's route has, nor drop their number). Returns (the
        fields changed, None, None), or ([], the error, its line in the edited file)."""
        try:
            text, settings = self._read()
        except ConfigError as err:
            return [], str(err), None
        doc = tomlkit.parse(text)
        index = next((i for i, b in enumerate(settings.bots) if b.name == name), None)
        if index is None:
            return [], f"no bot named {name!r}", None
        bot = settings.bots[index]
        table = doc["bots"][index]
        changed: list[str] = []
        for key in TEXT_FIELDS:
            if key not in fields:
                continue
            value = fields[key].replace("\r\n", "\n")
            if key != "persona":
                value = value.strip()
            current = _shown_voice(bot, doc["bots"], index) if key == "voice" else getattr(bot, key)
            if value != current:
                table[key] = tomlkit.string(value, multiline="\n" in value)
                changed.append(key)
        for key, kind in SAMPLING_FIELDS.items():
            if key not in fields or fields[key].strip() == "":
                continue
            try:
                value = kind(fields[key].strip())
            except ValueError:
                what = "an integer" if kind is int else "a number"
                return [], f"$.bots[{index}].sampling.{key}: {fields[key]!r} is not {what}", None
            if value != getattr(bot.sampling, key):
                if "sampling" not in table:
                    table["sampling"] = tomlkit.inline_table()
                table["sampling"][key] = value
                changed.append(f"sampling.{key}")
        for j, numbers in dids.items():
            if not (0 <= j < len(settings.routes)) or settings.routes[j].bot != name:
                return [], f"$.routes[{j}]: not a route of bot {name!r}", None
            new = [n.strip() for n in numbers.replace(";", ",").split(",") if n.strip()]
            old = settings.routes[j].did
            old_list = [] if old is None else ([old] if isinstance(old, str) else list(old))
            if new == old_list:
                continue
            if tenant is not None:
                problem = _foreign_numbers(settings, j, new, tenant)
                if problem:
                    return [], problem, None
            route = doc["routes"][j]
            if not new:
                route.pop("did", None)
            else:
                route["did"] = new[0] if len(new) == 1 else new
            changed.append(f"routes[{j}].did")
        if not changed:
            return [], None, None
        new_text = tomlkit.dumps(doc)
        try:
            parse_settings(new_text, base_dir=self.path.parent, resolve_secrets=False)
        except ConfigError as err:
            return [], f"{self.path}: {err}", error_line(new_text, str(err))
        try:
            save_text(self.path, new_text, loaded=loaded)
        except SaveError as err:
            return [], str(err), None
        return changed, None, None


def _shown_voice(bot: BotSettings, raw_bots, index: int) -> str:
    """The voice as the file writes it (a voice file's path relative to the config, not resolved)."""
    if index < len(raw_bots) and "voice" in raw_bots[index]:
        return str(raw_bots[index]["voice"])
    return bot.voice


def _foreign_numbers(settings: Settings, index: int, numbers: list[str], tenant: str) -> str | None:
    """Why a tenant's admin may not give route `index` these numbers: none (a route for any call), or one
    a route of another tenant's bot answers (routes are tried in order: it would take that tenant's calls)."""
    where = f"$.routes[{index}].did"
    if not numbers:
        return f"{where}: give at least one number (a route without one would take every tenant's calls)"
    tenant_of = {b.name: b.tenant for b in settings.bots}
    theirs = set()
    for r in settings.routes:
        if tenant_of.get(r.bot) != tenant and r.did is not None:
            theirs.update(normalize_number(d) for d in ([r.did] if isinstance(r.did, str) else r.did))
    taken = [n for n in numbers if normalize_number(n) in theirs]
    if taken:
        return f"{where}: {taken[0]!r} is another tenant's number"
    return None

