"""From a call record (the JSON sidecar's content, or the live record as a dict) and an events-file line
to the store's rows.

The record's shape is the SIP side's CallRecord (sip/call_record.py) plus what the recorder adds to the
sidecar (`recording`, `events`); the store reads it as plain JSON, so it never imports the SIP side, and
a field it does not know stays in `calls.record` all the same. An event is one line of the events file:
its fields, `event` (its type) and `ts` (ISO 8601 UTC, when it was logged).
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Any

TRANSFER_OF = "transfer_of"  # a consultation leg's label: the Call-ID of the call it transfers (app/calls.py)


def _str(value: Any, limit: int | None = None) -> str | None:
    if value is None or value == "":
        return None
    text = str(value)
    return text[:limit] if limit else text


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def outcome_of(record: dict) -> str:
    """How the call ended, in one word: open (going on, or cut by a crash), unanswered, transferred,
    caller_hangup, bot_hangup, or the SIP side's cause itself (max_duration, rtp_timeout, shutdown, ...)."""
    if record.get("end") is None:
        return "open"
    if record.get("answered") is None:
        return "unanswered"
    transfer = record.get("transfer") or {}
    cause = record.get("hangup_cause") or "unknown"
    if transfer.get("succeeded") or cause == "transfer":
        return "transferred"
    return {"remote": "caller_hangup", "local": "bot_hangup"}.get(cause, cause)


def flow_columns(flow: dict | None) -> dict:
    """The flow's name, the state it is in (or ended in) and the last reason, from record["flow"]."""
    if not isinstance(flow, dict):
        return {}
    path = flow.get("path") or []
    state = flow.get("state") or (path[-1] if path else None)
    return {"flow_name": _str(flow.get("name"), 128), "flow_state": _str(state, 128),
            "flow_reason": _str(flow.get("reason"), 64)}


def call_row(record: dict, *, complete: bool, directory: str | None = None) -> dict:
    """The calls row of a record. `directory`: where its sidecar lies (the recording's and the events
    file's names in the record are relative to it)."""
    labels = record.get("labels") or {}
    start, answered, end = _num(record.get("start")), _num(record.get("answered")), _num(record.get("end"))
    transfer = record.get("transfer") if isinstance(record.get("transfer"), dict) else {}
    recording = record.get("recording") if isinstance(record.get("recording"), dict) else {}

    def beside(name: Any) -> str | None:
        if not name:
            return None
        return os.path.join(directory, str(name)) if directory and not os.path.isabs(str(name)) else str(name)

    row = {
        "call_id": str(record["call_id"]),
        "direction": _str(record.get("direction"), 16),
        "tenant": _str(labels.get("tenant"), 64),
        "bot": _str(labels.get("bot"), 128),
        "route": _str(labels.get("route"), 128),
        "account": _str(record.get("account"), 128),
        "caller": _str(record.get("caller")),
        "called": _str(record.get("called")),
        "local_uri": _str(record.get("local_uri")),
        "remote_uri": _str(record.get("remote_uri")),
        "start_at": start,
        "answered_at": answered,
        "end_at": end,
        "duration_s": round(end - answered, 3) if end is not None and answered is not None else None,
        "codec": _str(record.get("codec"), 32),
        "clock_rate": _int(record.get("clock_rate")),
        "hangup_cause": _str(record.get("hangup_cause"), 32),
        "hangup_code": _int(record.get("hangup_code")),
        "hangup_reason": _str(record.get("hangup_reason")),
        "transfer_target": _str(transfer.get("target")),
        "transfer_succeeded": transfer.get("succeeded") if isinstance(transfer.get("succeeded"), bool) else None,
        "outcome": outcome_of(record),
        "complete": complete,
        "recording_path": beside(recording.get("wav")),
        "recording_seconds": _num(recording.get("seconds")),
        "events_path": beside(record.get("events")),
        "record": record,
        "updated_at": time.time(),
        "flow_name": None, "flow_state": None, "flow_reason": None,
    }
    row.update(flow_columns(record.get("flow")))
    return row


def leg_rows(record: dict) -> list[dict]:
    """The legs a record tells of: its blind transfer (a REFER) with the target's answers."""
    transfer = record.get("transfer")
    if not isinstance(transfer, dict):
        return []
    notes = transfer.get("notifications") or []
    last = notes[-1] if notes else None
    return [{
        "call_id": str(record["call_id"]), "kind": "transfer", "leg_call_id": None,
        "target": _str(transfer.get("target")), "started_at": None, "ended_at": _num(record.get("end")),
        "succeeded": transfer.get("succeeded") if isinstance(transfer.get("succeeded"), bool) else None,
        "code": _int(last[0]) if last else None, "reason": _str(last[1]) if last else None,
        "detail": {"notifications": notes},
    }]


def consultation_of(record: dict) -> str | None:
    """The Call-ID of the call this record's call is the consultation leg of (an attended transfer)."""
    return _str((record.get("labels") or {}).get(TRANSFER_OF))


def consultation_row(record: dict) -> dict:
    """The row, in the transferred call's legs, of this consultation leg."""
    return {
        "call_id": consultation_of(record), "kind": "consultation", "leg_call_id": str(record["call_id"]),
        "target": _str(record.get("remote_uri")), "started_at": _num(record.get("start")),
        "ended_at": _num(record.get("end")), "succeeded": None, "code": _int(record.get("hangup_code")),
        "reason": _str(record.get("hangup_reason")),
        "detail": {"answered": record.get("answered"), "cause": record.get("hangup_cause")},
    }


def event_time(line: dict) -> float | None:
    """Unix seconds of an events-file line's `ts`."""
    ts = line.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def event_row(call_id: str, line: dict) -> dict:
    return {"call_id": call_id, "t": event_time(line), "t_ms": _num(line.get("t_ms")),
            "type": str(line.get("event") or "unknown")[:64], "data": line}


def transition_row(call_id: str, line: dict) -> dict | None:
    """The flow_transitions row of a FlowTransition line (None for any other event)."""
    if line.get("event") != "FlowTransition":
        return None
    return {"call_id": call_id, "t": event_time(line), "t_ms": _num(line.get("t_ms")),
            "flow": str(line.get("flow") or "")[:128], "from_state": str(line.get("from_state") or "")[:128],
            "to_state": str(line.get("to_state") or "")[:128], "reason": str(line.get("reason") or "")[:64],
            "detail": str(line.get("detail") or "")}
