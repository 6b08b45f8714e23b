"""store/export.py: the call list as CSV and JSON, with cells a spreadsheet would run as formulas written as
text (a caller ID is whatever the calling side put in its From header), phone numbers untouched."""
from __future__ import annotations

import csv
import io
import json

from callbot.store.export import CSV_COLUMNS, safe_cell, write_calls


def _row(**over) -> dict:
    row = {"call_id": "c1", "start_at": 1796270000.0, "duration_s": 12.5, "direction": "inbound", "tenant": "acme",
           "bot": "support", "caller": "+15550100", "called": "100", "outcome": "caller_hangup",
           "hangup_cause": "remote", "flow_name": None, "flow_state": None, "complete": True,
           "categories": ["disclosure"], "scores": {"qa": 7.0}}
    row.update(over)
    return row


def test_formulas_are_written_as_text_and_numbers_as_they_are():
    for text in ("=HYPERLINK(\"http://evil\",\"x\")", "@SUM(A1:A9)", "+cmd|' /C calc'!A0", "-2+3+cmd", "\t=1",
                 "\r=1", "+", "-"):
        assert safe_cell(text) == "'" + text, text
    for text in ("+15550100", "+1 (212) 555-0100", "-12.5", "12", "support", "", "a=b"):
        assert safe_cell(text) == text, text
    assert safe_cell(None) == "" and safe_cell(True) == "True" and safe_cell(3.5) == "3.5"


def test_the_csv_has_the_columns_and_the_json_the_rows():
    out = io.StringIO()
    evil = '=HYPERLINK("http://evil.example/","call me")'
    write_calls([_row(), _row(call_id="c2", caller=evil, scores={})], "csv", out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    first = dict(zip(CSV_COLUMNS, rows[1]))
    assert first["caller"] == "+15550100" and first["start"] == "2026-12-03T03:53:20" and first["scores"] == "qa=7"
    assert first["flow_name"] == "" and first["categories"] == "disclosure"
    assert dict(zip(CSV_COLUMNS, rows[2]))["caller"] == "'" + evil
    out = io.StringIO()
    write_calls([_row()], "json", out)
    assert json.loads(out.getvalue())[0]["caller"] == "+15550100"
