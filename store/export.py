"""The call list written out as CSV or JSON: `callbot calls export` and the web panel's download.

Why a module: both write the same columns, and a CSV opened in a spreadsheet runs what looks like a
formula. A caller ID is whatever the calling side put in its From header (`=HYPERLINK(...)` is a valid
SIP user part), so a cell starting with `=`, `@`, a tab or a carriage return, or with `+` or `-` and not
a number (OWASP's "CSV injection"), is written with a leading apostrophe, which spreadsheets show as
text; phone numbers such as `+15550100` and negative numbers are written as they are.
"""
from __future__ import annotations

import csv
import json
import re
from typing import Iterable, TextIO

from callbot.store.queries import LIST_COLUMNS, iso

_NUMBER = re.compile(r"[+-]?[\d\s().-]*\d[\d\s().-]*")  # a phone number or a signed number
CSV_COLUMNS = (*LIST_COLUMNS, "start", "categories", "scores")


def safe_cell(value) -> str:
    """One CSV cell: '' for None, the text otherwise, neutralised if a spreadsheet would take it for a formula."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "@", "\t", "\r") or (text[:1] in ("+", "-") and not _NUMBER.fullmatch(text)):
        return "'" + text
    return text


def csv_row(row: dict) -> list[str]:
    """A listed call (store/queries.py list_calls) as the CSV's cells."""
    start = (iso(row["start_at"]) or "").replace("+00:00", "")
    return [safe_cell(v) for v in (*(row[c] for c in LIST_COLUMNS), start, ";".join(row["categories"]),
                                   ";".join(f"{k}={v:g}" for k, v in row["scores"].items()))]


def write_calls(rows: Iterable[dict], fmt: str, out: TextIO) -> None:
    """The calls as CSV (a header row, then one row each) or JSON (a list)."""
    if fmt == "json":
        json.dump(list(rows), out, indent=2)
        out.write("\n")
        return
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(csv_row(r))
