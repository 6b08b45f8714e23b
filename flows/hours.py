"""Business hours: when a flow's line is open, in its own time zone, with its closed days.

A flow file's `[hours]` table gives the runner four variables at each state it enters, which `branch`
rules and texts use like any other: `open` ("yes" / "no"), `weekday` ("mon" .. "sun"), `local_time`
("HH:MM") and `local_date` ("YYYY-MM-DD"), all in `timezone`. So "closed: play the hours and take a
message" is a branch on `open`, and holidays are `closed_dates`:

    [hours]
    timezone = "America/New_York"
    open = { mon = "09:00-18:00", tue = "09:00-18:00", wed = "09:00-18:00", thu = "09:00-18:00",
             fri = "09:00-17:00", sat = "10:00-12:00,13:00-14:00" }    # a day not named: closed
    closed_dates = ["2026-12-25", "2027-01-01"]

Why our own: the rule is a dozen lines over zoneinfo (the IANA database Python ships, DST included),
and the campaigns' calling windows (campaigns/config.py) are another room the flows may not import.
"""
from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


class HoursError(ValueError):
    """A field of `[hours]` that cannot be used (one line, naming the field)."""


def spans(text: str) -> list[tuple[int, int]]:
    """'09:00-12:00,13:00-17:30' as [(540, 720), (780, 1050)] minutes of the day (start inclusive, end
    exclusive; "24:00" is the day's end). HoursError for anything else, or a span that ends before it starts."""
    out = []
    for part in text.split(","):
        m = _SPAN.match(part.strip())
        if m is None:
            raise HoursError(f"{text!r}: expected HH:MM-HH:MM, several separated by commas")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise HoursError(f"{part.strip()!r}: not times of day")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if end <= start:
            raise HoursError(f"{part.strip()!r}: the end must come after the start (a span across midnight is "
                             "two: the evening's and the next morning's)")
        out.append((start, end))
    return out


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HoursError(f"timezone {name!r}: not an IANA time zone (e.g. Europe/Paris, America/New_York)") from None


def check_date(text: str) -> None:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise HoursError(f"{text!r}: not a date (YYYY-MM-DD)") from None


def hours_variables(when: float, timezone: str, open_hours: dict[str, str], closed_dates: tuple[str, ...]) -> dict[str, str]:
    """The variables at Unix time `when`: open (yes/no), weekday, local_time, local_date."""
    local = dt.datetime.fromtimestamp(when, zone(timezone))
    day, date = DAYS[local.weekday()], local.date().isoformat()
    minute = local.hour * 60 + local.minute
    today = open_hours.get(day)  # a day not named is closed
    is_open = today is not None and date not in closed_dates and any(a <= minute < b for a, b in spans(today))
    return {"open": "yes" if is_open else "no", "weekday": day, "local_time": f"{local:%H:%M}", "local_date": date}
