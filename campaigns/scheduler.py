"""Which row to call next, and when: a pure function of the campaign, the rows' states and the time.

Why pure, on an injected clock: windows in many time zones, pacing, a concurrency cap and retry
back-offs interact, and only a clock the tests move by hand can check every case without waiting (the
dialer passes time.time()). The scheduler owns no threads and no I/O; app/campaign_runner.py asks it
`next(now, active)` and tells it `started` / `finished`.

Rules:
- a row on the do-not-call list is never dialled: it ends at once as `do-not-call`;
- a row is dialled only inside its window (its own time zone), with fewer than `max_concurrent` calls
  up and at least 1 / `calls_per_second` after the previous dial; rows go in list order, a retry when
  its back-off is over (the earliest due first);
- after an attempt, the outcome's retry rule (busy, no_answer, failed, machine) says whether the row is
  called again (`backoff_s` later) or is done; answered-human, do-not-call, outside-window and
  interrupted end a row; refused-by-admission (our own side had no room) does not count as an attempt
  and is tried again ADMISSION_BACKOFF_S later;
- past the campaign's `ends_at`, rows not done end as `outside-window`.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable

from callbot.campaigns.config import DAYS, Campaign, zone
from callbot.campaigns.contacts import Contact

# dispositions (the report's and the state's words)
HUMAN = "answered-human"
MACHINE = "answered-machine"
BUSY = "busy"
NO_ANSWER = "no-answer"
FAILED = "failed"
REFUSED = "refused-by-admission"
DNC = "do-not-call"
OUTSIDE = "outside-window"
INTERRUPTED = "interrupted"  # the dialer died during the attempt (campaigns/state.py: the restart rule)
DISPOSITIONS = (HUMAN, MACHINE, BUSY, NO_ANSWER, FAILED, REFUSED, DNC, OUTSIDE, INTERRUPTED)
RETRIED_AS = {BUSY: "busy", NO_ANSWER: "no_answer", FAILED: "failed", MACHINE: "machine"}
ADMISSION_BACKOFF_S = 5.0


@dataclass
class RowState:
    attempts: int = 0
    next_at: float = 0.0  # not before (a retry's back-off)
    active: bool = False
    disposition: str | None = None  # the last attempt's
    done: bool = False


@dataclass(frozen=True)
class Dial:
    contact: Contact
    attempt: int  # 1 for the first


@dataclass(frozen=True)
class Close:
    """A row that ends without a call: do-not-call, or outside-window past the campaign's end."""

    contact: Contact
    disposition: str


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: nothing is due before a call in progress ends


@dataclass(frozen=True)
class Done:
    pass


Decision = Dial | Close | Wait | Done


class Scheduler:
    def __init__(self, campaign: Campaign, contacts: Iterable[Contact], dnc: frozenset[str] = frozenset(),
                 states: dict[int, RowState] | None = None):
        self.campaign = campaign
        self.contacts = list(contacts)
        self.dnc = dnc
        self.states = states if states is not None else {}
        for c in self.contacts:
            self.states.setdefault(c.row, RowState())
        self.last_dial_at: float | None = None
        self._ends_at = campaign.ends_at_s
        start, end = campaign.window.minutes
        self._window = (start, end, frozenset(DAYS.index(d) for d in campaign.window.days))

    # ---- questions ---------------------------------------------------------------------------------

    def active(self) -> int:
        return sum(s.active for s in self.states.values())

    def done(self) -> bool:
        return all(s.done for s in self.states.values())

    def window_open(self, contact: Contact, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, zone(contact.tz))
        start, end, days = self._window
        minute = local.hour * 60 + local.minute + local.second / 60
        return local.weekday() in days and start <= minute < end

    def next_open(self, contact: Contact, now: float) -> float:
        """The first instant at or after `now` when the row's window is open."""
        if self.window_open(contact, now):
            return now
        tz = zone(contact.tz)
        start, end, days = self._window
        local = dt.datetime.fromtimestamp(now, tz)
        for ahead in range(0, 8):
            day = (local + dt.timedelta(days=ahead)).date()
            if day.weekday() not in days:
                continue
            opening = dt.datetime.combine(day, dt.time(start // 60, start % 60), tz)
            # a wall time a DST change skips: fold and fromtimestamp put it on the right side of the gap
            at = opening.timestamp()
            if at >= now:
                return at
        raise AssertionError("a window with at least one day opens within a week")

    def next(self, now: float) -> Decision:
        """What to do at `now` (wall-clock unix seconds)."""
        ready: list[tuple[float, int, Contact]] = []
        wake: float | None = None
        for c in self.contacts:
            s = self.states[c.row]
            if s.done or s.active:
                continue
            if self.dnc and c.number in self.dnc:
                return Close(c, DNC)
            if self._ends_at is not None and now >= self._ends_at:
                return Close(c, OUTSIDE)
            due = max(s.next_at, self.next_open(c, max(now, s.next_at)))
            if due <= now:
                ready.append((s.next_at, c.row, c))
            else:
                wake = due if wake is None else min(wake, due)
        if not ready:
            if wake is None and self.active() == 0:
                return Done()
            if wake is not None and self._ends_at is not None:
                wake = min(wake, self._ends_at)
            return Wait(wake)
        if self.active() >= self.campaign.max_concurrent:
            return Wait(None)  # a call ending frees a slot
        if self.last_dial_at is not None:
            pace = self.last_dial_at + 1.0 / self.campaign.calls_per_second
            if now < pace:
                return Wait(pace)
        ready.sort(key=lambda t: (t[0], t[1]))
        c = ready[0][2]
        return Dial(c, self.states[c.row].attempts + 1)

    # ---- what happened ---------------------------------------------------------------------------

    def started(self, row: int, now: float) -> None:
        s = self.states[row]
        s.active = True
        s.attempts += 1
        self.last_dial_at = now

    def unstarted(self, row: int) -> None:
        """The attempt `started` did not begin after all (its state could not be committed, so no INVITE
        left): the row is as it was before."""
        s = self.states[row]
        s.active = False
        s.attempts -= 1

    def closed(self, row: int, disposition: str) -> None:
        """A row ended without a call (Close)."""
        s = self.states[row]
        s.disposition, s.done = disposition, True

    def finished(self, row: int, disposition: str, now: float) -> bool:
        """The attempt on `row` ended with `disposition`; returns True when the row is done."""
        s = self.states[row]
        s.active = False
        s.disposition = disposition
        if disposition == REFUSED:
            s.attempts -= 1  # our side had no room: the callee never heard of it
            s.next_at = now + ADMISSION_BACKOFF_S
            return False
        outcome = RETRIED_AS.get(disposition)
        if outcome is None:
            s.done = True
            return True
        rule = self.campaign.retries.rule(outcome)
        if s.attempts >= rule.max_attempts:
            s.done = True
            return True
        s.next_at = now + rule.backoff_s
        return False
