"""The call list (CSV) and the do-not-call list.

The list: a header row, then one row per person. `number` (a phone number, dialled as sip:NUMBER@host
with --host/the account's domain) or `uri` (a whole SIP URI) says whom to call; an optional `tz` column
gives the row's time zone (IANA name; else the campaign's `timezone`); every other column is a variable
of the call (`{name}`, `{amount_due}` in the bot's persona and flow). Rows are numbered from 1 in file
order: the number is the row's identity in the campaign's state, so the list must not be reordered
while a campaign over it is unfinished (the state file records the list's digest and refuses a changed
list).

The do-not-call file: one number per line (`#` comments, blank lines); numbers compare by their digits
only, so "+1 (555) 010-2000" and "15550102000" are one number.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field

from callbot.campaigns.config import CampaignError, zone

MAX_ROWS = 1_000_000
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Contact:
    row: int  # 1-based, in file order
    target: str  # a number or a SIP URI, as the list has it
    tz: str
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def number(self) -> str:
        """The digits of the target (the DNC key); "" for a URI without a number in its user part."""
        user = self.target
        if user.startswith(("sip:", "sips:")):
            user = user.split(":", 1)[1].split("@", 1)[0]
        return digits(user)

    def uri(self, host: str | None) -> str:
        if self.target.startswith(("sip:", "sips:")):
            return self.target
        if host is None:
            raise CampaignError(f"row {self.row}: {self.target!r} is a number: give --host (where numbers "
                                "are dialled) or a uri column")
        return f"sip:{re.sub(r'[^0-9+*#]', '', self.target)}@{host}"


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def load_contacts(path: str | os.PathLike, default_tz: str) -> tuple[list[Contact], str]:
    """The list's rows and its digest (sha256 of the file); CampaignError with one line on a bad list."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise CampaignError(f"{name}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CampaignError(f"{name}: not UTF-8 text (byte {err.start})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise CampaignError(f"{name}: empty (a header row with number or uri is needed)")
    header = [h.strip() for h in header]
    key = "uri" if "uri" in header else "number" if "number" in header else None
    if key is None:
        raise CampaignError(f"{name}: line 1: no `number` or `uri` column (columns: {', '.join(header)})")
    if len(set(header)) != len(header):
        raise CampaignError(f"{name}: line 1: a column name appears twice")
    for h in header:
        if h not in ("uri", "number", "tz") and not _VARIABLE.match(h):
            raise CampaignError(f"{name}: line 1: column {h!r} is not a variable name (letters, digits, _)")
    default_zone = default_tz
    contacts: list[Contact] = []
    for line, values in enumerate(reader, start=2):
        if not values or not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise CampaignError(f"{name}: line {line}: {len(values)} fields, the header has {len(header)}")
        cells = dict(zip(header, (v.strip() for v in values)))
        target = cells[key]
        if not target:
            raise CampaignError(f"{name}: line {line}: no {key}")
        if key == "uri" and not target.startswith(("sip:", "sips:")):
            raise CampaignError(f"{name}: line {line}: {target!r} is not a sip: URI")
        if key == "number" and not digits(target):
            raise CampaignError(f"{name}: line {line}: {target!r} has no digits")
        tz = cells.get("tz") or default_zone
        try:
            zone(tz)
        except ValueError as err:
            raise CampaignError(f"{name}: line {line}: {err}") from None
        variables = {k: v for k, v in cells.items() if k not in ("uri", "number", "tz")}
        contacts.append(Contact(row=len(contacts) + 1, target=target, tz=tz, variables=variables))
        if len(contacts) > MAX_ROWS:
            raise CampaignError(f"{name}: more than {MAX_ROWS} rows: split the list")
    return contacts, hashlib.sha256(raw).hexdigest()


def load_dnc(path: str | os.PathLike | None) -> frozenset[str]:
    """The numbers (digits) never to call; an empty set without a file."""
    if path is None:
        return frozenset()
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise CampaignError(f"do-not-call list {name}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CampaignError(f"do-not-call list {name}: not UTF-8 text") from None
    numbers = set()
    for i, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        d = digits(line)
        if not d:
            raise CampaignError(f"do-not-call list {name}: line {i}: {line!r} has no digits")
        numbers.add(d)
    return frozenset(numbers)
