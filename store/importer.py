"""Bringing calls into the store from the files `callbot serve` writes beside each recording: the JSON
sidecar (the call record) and the events file (`.events.jsonl`, one event a line).

For calls recorded before the store existed, with the store off, while its database was down, or cut
by a crash (their sidecar and events file are more current than the store's last commit). Importing is
idempotent: a call the store holds complete is left as it is; any other is written from its files
(replacing what the store had of it: the files hold at least as much). A folder is searched with its
subfolders (tenants' folders); a file that is not a sidecar (not JSON, no call_id, no recording) is
counted and named, never fatal, and so is a bad line of an events file.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Iterator

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from callbot.store.call_store import CallStore

SIDECAR_MAX_BYTES = 64 * 1024 * 1024  # a sidecar is kilobytes; anything far larger is not one


ANALYSIS_SUFFIX = ".analysis.json"  # a call's analysis file beside its recording (app/analysis_host.py)


@dataclass
class ImportReport:
    imported: int = 0
    replaced: int = 0
    skipped: int = 0  # already complete in the store
    events: int = 0
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)  # "file: why", one per file not imported


def sidecars(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
    """The JSON files under `directory` that may be sidecars, oldest name first (names start with the
    call's UTC start); a call's analysis beside them (`<name>.analysis.json`, app/analysis_host.py) is
    not one."""
    for path in sorted(pathlib.Path(directory).rglob("*.json")):
        if path.is_file() and not path.name.endswith(ANALYSIS_SUFFIX):
            yield path


def _events(path: pathlib.Path, report: ImportReport) -> Iterator[dict]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:  # a line cut by a crash, or not ours
                report.bad_lines += 1
                continue
            if isinstance(line, dict):
                report.events += 1
                yield line
            else:
                report.bad_lines += 1


def import_dir(store: CallStore, directory: str | os.PathLike) -> ImportReport:
    """Imports every call recorded under `directory` (see the module docstring)."""
    report = ImportReport()
    if not os.path.isdir(directory):
        report.problems.append(f"{os.fspath(directory)}: not a folder")
        return report
    for path in sidecars(directory):
        why = import_sidecar(store, path, report)
        if why is not None:
            report.problems.append(f"{path}: {why}")
    return report


def import_sidecar(store: CallStore, path: pathlib.Path, report: ImportReport, merge: bool = False) -> str | None:
    """One call from its sidecar and events file; None, or why it is not imported. `merge`: see
    CallStore.import_call (counted in `replaced`)."""
    try:
        if path.stat().st_size > SIDECAR_MAX_BYTES:
            return "too large to be a call record"
        record = json.loads(path.read_bytes())
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("call_id"), str) or "recording" not in record:
        return "not a call record (no call_id or recording)"
    events_name = record.get("events")
    events_path = path.parent / events_name if isinstance(events_name, str) and events_name else None
    lines = _events(events_path, report) if events_path is not None and events_path.is_file() else None
    try:
        outcome = store.import_call(record, lines, directory=os.fspath(path.parent.resolve()), merge=merge)
    except (OperationalError, InterfaceError):
        raise  # the database itself: the whole import stops with one line (app/cli.py)
    except (SQLAlchemyError, ValueError, TypeError) as err:  # this file's content: the next file goes on
        text = str(getattr(err, "orig", None) or err).strip()
        return f"not imported: {text.splitlines()[0] if text else type(err).__name__}"
    if outcome == "imported":
        report.imported += 1
    elif outcome in ("replaced", "merged"):
        report.replaced += 1
    else:
        report.skipped += 1
    return None
