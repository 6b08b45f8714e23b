"""Campaigns from the HTTP API: start `callbot campaign run` processes, list them, read their progress,
pause / resume / stop them. Mounted in the store's JSON API (store/api.py) by `callbot calls api` and
`callbot serve` ([store] api), so it answers on the same 127.0.0.1 address.

    POST /api/campaigns                   {"list_csv": "uri,name\\n...", "campaign_toml": "max_concurrent = 2\\n..."}
                                          or {"list": "/path/list.csv", "campaign": "/path/campaign.toml"}
                                          optional: "bot", "engine" (model | echo), "config" (a config file
                                          on this machine for the dialer; default the API's own),
                                          "paused": true (nothing dialled before a resume)
    GET  /api/campaigns                   every campaign this folder holds, newest first
    GET  /api/campaigns/{id}              one, with its progress: rows done of all, counts by outcome
    POST /api/campaigns/{id}/pause|resume|stop

Why a process per campaign and not a thread of the API: a campaign is a SIP dialer with an engine (the
same `callbot campaign run` a person starts by hand), its state file is the restart rule
(campaigns/state.py), and a dialer that dies takes nothing else down; the API only starts them, reads
their state files and writes the words of their --control file (app/campaign_runner.py Control). So
everything a campaign needs is in its folder, <recordings_dir>/campaigns/<id>/: the list and campaign
files (uploaded ones are written there; relative paths inside an uploaded campaign file, dnc and
message_wav, are read from that folder), the state file, the control file, campaign.log, report.json and
campaign.json (how it was started, its pid). An API started again finds them there.

A bad list or campaign file is a 400 with its one line (checked before any process starts).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from callbot.app.atomic_file import replace_file
from callbot.campaigns.config import CampaignError, load_campaign
from callbot.campaigns.contacts import load_contacts
from callbot.campaigns.state import state_path

ACTIONS = ("pause", "resume", "stop")
UPLOAD_MAX = 20 * 1024 * 1024  # bytes of a request body: a list of some 200 000 rows


class CampaignApiError(Exception):
    """A request that cannot be done; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class CampaignRegistry:
    """The campaigns under `folder` (one sub-folder each) and the processes this registry started."""

    def __init__(self, folder: str, config: str | None = None, python: str = sys.executable,
                 config_required: bool = False, engine: str = "model"):
        self.folder = os.path.abspath(folder)
        self.config = os.path.abspath(config) if config else None
        self.config_required = config_required  # `callbot serve`: a dialer with the server's config would clash
        self.engine = engine  # what answers the callees when a start names none ([campaigns] engine)
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # ---- start --------------------------------------------------------------------------------------

    def start(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise CampaignApiError("the body must be a JSON object")
        cid = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
        home = os.path.join(self.folder, cid)
        try:
            os.makedirs(home, exist_ok=False)
        except OSError as err:
            raise CampaignApiError(f"campaign folder {home}: cannot make it ({err.strerror or err})", 507) from None
        try:
            return self._start(body, cid, home)
        except OSError as err:  # a full disk, a folder that cannot be written: nothing of it is left
            _remove_tree(home)
            raise CampaignApiError(f"campaign files under {self.folder}: cannot write them "
                                   f"({err.strerror or err})", 507) from None

    def _start(self, body: dict, cid: str, home: str) -> dict:
        try:
            list_path = self._file(body, "list", "list_csv", os.path.join(home, "list.csv"))
            campaign_path = self._file(body, "campaign", "campaign_toml", os.path.join(home, "campaign.toml"))
            try:
                campaign = load_campaign(campaign_path)
                rows = len(load_contacts(list_path, campaign.timezone)[0])
            except CampaignError as err:
                raise CampaignApiError(str(err)) from None
            engine = body.get("engine", self.engine)
            if engine not in ("model", "echo"):
                raise CampaignApiError(f"engine {engine!r}: model or echo")
            bot, config = body.get("bot"), body.get("config") or self.config
            for key, value in (("bot", bot), ("config", config)):
                if value is not None and not isinstance(value, str):
                    raise CampaignApiError(f"{key}: a string")
            if config is None and self.config_required:
                raise CampaignApiError("config: the dialer's own config file on this machine (the server's SIP "
                                       "port and API address are taken by the server itself); or [campaigns] "
                                       "dialer_config in the server's config")
            if config is not None and not os.path.isfile(config):
                raise CampaignApiError(f"config {config!r}: no such file")
        except CampaignApiError:
            _remove_tree(home)
            raise
        control = os.path.join(home, "control")
        if body.get("paused"):  # started paused: nothing is dialled before a resume
            _write_text(control, "pause\n")
        args = [self.python, "-m", "callbot.app.cli", "campaign", "run", list_path, "--campaign", campaign_path,
                "--engine", engine, "--report", os.path.join(home, "report.json"), "--control", control]
        if bot:
            args += ["--bot", bot]
        if config:
            args += ["--config", os.path.abspath(config)]
        with open(os.path.join(home, "campaign.log"), "ab") as log:
            proc = subprocess.Popen(args, cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # a Ctrl-C of the API leaves the dialers alone
        meta = {"id": cid, "rows": rows, "list": list_path, "campaign": campaign_path, "bot": bot, "engine": engine,
                "config": config, "pid": proc.pid, "started_at": time.time()}
        try:
            _write_json(os.path.join(home, "campaign.json"), meta)
        except OSError:
            proc.terminate()  # still starting (seconds before its first call): it never dials
            proc.wait(30)
            raise
        with self.lock:
            self.procs[cid] = proc
        return self.show(cid)

    def _file(self, body: dict, path_key: str, text_key: str, upload_to: str) -> str:
        path, text = body.get(path_key), body.get(text_key)
        if (path is None) == (text is None):
            raise CampaignApiError(f"give {path_key!r} (a path on this machine) or {text_key!r} (its text), one of them")
        if path is not None:
            if not isinstance(path, str) or not os.path.isfile(path):
                raise CampaignApiError(f"{path_key} {path!r}: no such file")
            return os.path.abspath(path)
        if not isinstance(text, str):
            raise CampaignApiError(f"{text_key}: the file's text, a string")
        with open(upload_to, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        return upload_to

    # ---- read ---------------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        return sorted((n for n in names if os.path.isfile(os.path.join(self.folder, n, "campaign.json"))),
                      reverse=True)

    def show(self, cid: str) -> dict:
        meta = self._meta(cid)
        status, rc = self._status(cid, meta)
        return {**meta, "status": status, "exit_status": rc, "progress": progress(meta["list"], meta.get("rows"))}

    def all(self) -> list[dict]:
        out = []
        for cid in self.ids():
            try:
                out.append(self.show(cid))
            except CampaignApiError:
                continue
        return out

    def _meta(self, cid: str) -> dict:
        if "/" in cid or cid.startswith("."):
            raise CampaignApiError("no such campaign", 404)
        try:
            with open(os.path.join(self.folder, cid, "campaign.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            raise CampaignApiError("no such campaign", 404) from None

    def _status(self, cid: str, meta: dict) -> tuple[str, int | None]:
        with self.lock:
            proc = self.procs.get(cid)
        if proc is not None:
            rc = proc.poll()
            if rc is not None:
                return ("finished" if rc == 0 else "failed"), rc
        elif not _alive(meta.get("pid")):
            return "ended", None  # started by an API before this one: its exit status is in campaign.log
        word = _read(os.path.join(self.folder, cid, "control"))
        return {"pause": "paused", "stop": "stopping"}.get(word, "running"), None

    # ---- control ------------------------------------------------------------------------------------

    def control(self, cid: str, action: str) -> dict:
        if action not in ACTIONS:
            raise CampaignApiError(f"{action!r}: pause, resume or stop", 404)
        meta = self._meta(cid)
        status, _ = self._status(cid, meta)
        if status in ("finished", "failed", "ended"):
            raise CampaignApiError(f"campaign {cid} has {status}: nothing to {action}", 409)
        try:
            _write_text(os.path.join(self.folder, cid, "control"), action + "\n")
        except OSError as err:
            raise CampaignApiError(f"campaign {cid}: the control file cannot be written ({err.strerror or err}); "
                                   f"the dialer also takes SIGUSR1 (pause), SIGUSR2 (resume), SIGTERM (stop)",
                                   507) from None
        return self.show(cid)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the dialers this registry started and waits for them (a second stop hangs up their calls)."""
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def progress(list_path: str, rows: int | None) -> dict:
    """Rows done of all and counts by outcome, from the campaign's state file (read-only; none yet: zeros)."""
    out: dict[str, Any] = {"rows": rows, "done": 0, "attempts": 0, "up": 0, "by_outcome": {}}
    path = state_path(list_path)
    if not os.path.exists(path):
        return out
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            out["done"] = db.execute("select count(*) from rows where done = 1").fetchone()[0]
            out["attempts"] = db.execute("select count(*) from attempts where attempt > 0").fetchone()[0]
            out["by_outcome"] = dict(db.execute("select disposition, count(*) from attempts where status = 'ended'"
                                                " group by disposition").fetchall())
            out["up"] = db.execute("select count(*) from attempts where status != 'ended'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as err:
        out["error"] = f"state file: {err}"
    return out


def routes(registry: CampaignRegistry) -> list[Route]:
    """The campaign routes, for store/api.py's app (sync handlers: Starlette's thread pool)."""

    def answer(fn):
        async def endpoint(request: Request):
            body = None
            if request.method == "POST" and fn is start:
                raw = await request.body()
                if len(raw) > UPLOAD_MAX:
                    return JSONResponse({"error": f"the body is over {UPLOAD_MAX} bytes"}, status_code=413)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return JSONResponse({"error": "the body is not JSON"}, status_code=400)
            from starlette.concurrency import run_in_threadpool

            try:
                return JSONResponse(await run_in_threadpool(fn, request, body))
            except CampaignApiError as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            except OSError as err:
                return JSONResponse({"error": f"campaigns folder {registry.folder}: {err.strerror or err}"},
                                    status_code=503)
        return endpoint

    def start(request, body):
        return registry.start(body)

    def listing(request, body):
        return {"campaigns": registry.all()}

    def one(request, body):
        return registry.show(request.path_params["cid"])

    def act(request, body):
        return registry.control(request.path_params["cid"], request.path_params["action"])

    return [
        Route("/api/campaigns", answer(start), methods=["POST"]),
        Route("/api/campaigns", answer(listing), methods=["GET"]),
        Route("/api/campaigns/{cid}", answer(one), methods=["GET"]),
        Route("/api/campaigns/{cid}/{action}", answer(act), methods=["POST"]),
    ]


def _alive(pid: Any) -> bool:
    """Whether a dialer this registry did not start runs: a process of that pid that has not exited. One
    that exited but was not reaped yet by its parent (another registry in this process or another: the
    HTTP API's, a test's) is a zombie, and over."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Linux: the state in /proc/PID/stat; macOS (no /proc): `ps -o stat=`."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # the name in () may hold spaces
        except (OSError, IndexError):
            return True  # gone meanwhile
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().startswith("Z")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip().lower()
    except (OSError, UnicodeDecodeError):
        return ""


def _write_text(path: str, text: str) -> None:
    replace_file(path, text.encode("utf-8"))  # the dialer reads the old word or the new one


def _write_json(path: str, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
