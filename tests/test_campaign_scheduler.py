"""The campaign scheduler (campaigns/scheduler.py) on an injected clock: windows in each row's time zone,
the concurrency cap, pacing, retries with back-off, do-not-call, the campaign's end."""
from __future__ import annotations

import datetime as dt
import itertools

import pytest

from callbot.campaigns import scheduler as sch
from callbot.campaigns.config import Campaign, Retries, Retry, Window
from callbot.campaigns.contacts import Contact


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def contacts(*tzs: str) -> list[Contact]:
    return [Contact(row=i + 1, target=f"sip:{1000 + i}@example.com", tz=tz) for i, tz in enumerate(tzs)]


ALWAYS = Window(hours="00:00-24:00")


def test_rows_go_in_order_within_the_cap_and_the_pace():
    s = sch.Scheduler(Campaign(max_concurrent=2, calls_per_second=2.0, window=ALWAYS), contacts(*["UTC"] * 4))
    t = at("2026-12-03T10:00:00+00:00")
    d = s.next(t)
    assert isinstance(d, sch.Dial) and d.contact.row == 1 and d.attempt == 1
    s.started(1, t)
    assert s.next(t) == sch.Wait(t + 0.5)  # the pace: 2 calls a second
    d = s.next(t + 0.5)
    assert d.contact.row == 2
    s.started(2, t + 0.5)
    assert s.next(t + 10) == sch.Wait(None)  # the cap: a call must end first
    s.finished(1, sch.HUMAN, t + 11)
    assert s.next(t + 11).contact.row == 3


def test_windows_are_each_rows_own_time_zone_and_rows_outside_are_skipped_until_theirs_opens():
    c = Campaign(max_concurrent=10, calls_per_second=100, window=Window(hours="09:00-20:00"))
    s = sch.Scheduler(c, contacts("Europe/Paris", "America/New_York", "Asia/Tokyo"))
    t = at("2026-12-03T09:30:00+00:00")  # Paris 10:30 (open), New York 04:30 (closed), Tokyo 18:30 (open)
    d1 = s.next(t)
    assert d1.contact.tz == "Europe/Paris"
    s.started(d1.contact.row, t)
    d2 = s.next(t + 1)
    assert d2.contact.tz == "Asia/Tokyo"  # New York is skipped, not waited for
    s.started(d2.contact.row, t + 1)
    w = s.next(t + 2)
    assert w == sch.Wait(at("2026-12-03T09:00:00-05:00"))  # New York's 09:00
    assert isinstance(s.next(at("2026-12-03T08:59:59-05:00")), sch.Wait)
    assert s.next(at("2026-12-03T09:00:00-05:00")).contact.tz == "America/New_York"


def test_days_weekends_and_the_window_end_are_respected():
    c = Campaign(window=Window(hours="09:00-17:00", days=("mon", "tue", "wed", "thu", "fri")))
    s = sch.Scheduler(c, contacts("Europe/Berlin"))
    row = s.contacts[0]
    friday_late = at("2026-12-04T17:00:00+01:00")  # a Friday, the end is exclusive
    assert not s.window_open(row, friday_late)
    assert s.window_open(row, friday_late - 1)
    assert s.next(friday_late) == sch.Wait(at("2026-12-07T09:00:00+01:00"))  # Monday
    assert s.next_open(row, at("2026-12-05T12:00:00+01:00")) == at("2026-12-07T09:00:00+01:00")


def test_daylight_saving_change_keeps_the_local_hours():
    s = sch.Scheduler(Campaign(window=Window(hours="09:00-20:00")), contacts("America/New_York"))
    row = s.contacts[0]
    # the Sunday clocks go forward (2027-03-14): 09:00 local is 13:00 UTC after, 14:00 UTC the day before
    assert s.next_open(row, at("2027-03-13T21:00:00-05:00")) == at("2027-03-14T09:00:00-04:00")
    assert s.next_open(row, at("2027-03-13T05:00:00-05:00")) == at("2027-03-13T09:00:00-05:00")


RETRIES = Retries(busy=Retry(backoff_s=60, max_attempts=3), no_answer=Retry(backoff_s=600, max_attempts=2),
                  failed=Retry(backoff_s=5, max_attempts=1), machine=Retry(backoff_s=3600, max_attempts=2))


@pytest.mark.parametrize("disposition,rule", [(sch.BUSY, RETRIES.busy), (sch.NO_ANSWER, RETRIES.no_answer),
                                              (sch.FAILED, RETRIES.failed), (sch.MACHINE, RETRIES.machine)])
def test_each_outcome_is_retried_after_its_back_off_up_to_its_maximum(disposition, rule):
    s = sch.Scheduler(Campaign(window=ALWAYS, retries=RETRIES, calls_per_second=100), contacts("UTC"))
    t = at("2026-12-03T10:00:00+00:00")
    dials = 0
    while True:
        d = s.next(t)
        if isinstance(d, sch.Done):
            break
        if isinstance(d, sch.Wait):
            assert d.until == t + rule.backoff_s  # from the end of the attempt
            t = d.until
            continue
        dials += 1
        assert d.attempt == dials
        s.started(1, t)
        t += 1
        s.finished(1, disposition, t)
    assert dials == rule.max_attempts
    assert s.states[1].done and s.states[1].disposition == disposition


def test_back_off_is_measured_from_the_end_of_the_attempt():
    s = sch.Scheduler(Campaign(window=ALWAYS, retries=RETRIES), contacts("UTC"))
    t = at("2026-12-03T10:00:00+00:00")
    s.started(1, t)
    assert s.finished(1, sch.BUSY, t + 30) is False
    assert s.next(t + 31) == sch.Wait(t + 90)
    assert s.next(t + 90).attempt == 2


@pytest.mark.parametrize("final", [sch.HUMAN, sch.INTERRUPTED])
def test_final_outcomes_end_the_row(final):
    s = sch.Scheduler(Campaign(window=ALWAYS, retries=RETRIES), contacts("UTC"))
    s.started(1, 0.0)
    assert s.finished(1, final, 1.0) is True
    assert s.next(2.0) == sch.Done()


def test_refused_by_admission_is_no_attempt_and_comes_back_shortly():
    s = sch.Scheduler(Campaign(window=ALWAYS, retries=RETRIES), contacts("UTC"))
    t = at("2026-12-03T10:00:00+00:00")
    s.started(1, t)
    s.finished(1, sch.REFUSED, t)
    assert s.states[1].attempts == 0 and not s.states[1].done
    assert s.next(t + sch.ADMISSION_BACKOFF_S) == sch.Dial(s.contacts[0], 1)


def test_do_not_call_rows_close_without_a_dial_and_the_others_go_on():
    cs = [Contact(1, "+1 (555) 010-2000", "UTC"), Contact(2, "sip:15550103000@example.com", "UTC"),
          Contact(3, "sip:15550104000@example.com", "UTC")]
    s = sch.Scheduler(Campaign(window=ALWAYS), cs, dnc=frozenset({"15550102000", "15550104000"}))
    seen = []
    t = 0.0
    while not isinstance(d := s.next(t), sch.Done):
        if isinstance(d, sch.Close):
            s.closed(d.contact.row, d.disposition)
            seen.append((d.contact.row, d.disposition))
        elif isinstance(d, sch.Dial):
            s.started(d.contact.row, t)
            s.finished(d.contact.row, sch.HUMAN, t)
            seen.append((d.contact.row, "dialled"))
        t += 1
    assert seen == [(1, sch.DNC), (3, sch.DNC), (2, "dialled")]  # DNC rows close as soon as they are met


def test_past_the_campaigns_end_rows_not_done_are_outside_window():
    c = Campaign(window=Window(hours="09:00-10:00"), ends_at="2026-12-03T12:00:00+00:00")
    s = sch.Scheduler(c, contacts("UTC", "UTC"))
    t = at("2026-12-03T11:00:00+00:00")
    assert s.next(t) == sch.Wait(at("2026-12-03T12:00:00+00:00"))  # tomorrow's window is past the end
    d = s.next(at("2026-12-03T12:00:00+00:00"))
    assert d == sch.Close(s.contacts[0], sch.OUTSIDE)


def test_a_random_walk_never_exceeds_the_cap_or_the_pace_and_every_row_ends():
    import random

    rnd = random.Random(7)
    outcomes = [sch.HUMAN, sch.BUSY, sch.NO_ANSWER, sch.FAILED, sch.MACHINE, sch.REFUSED]
    for cap, cps in itertools.product((1, 3), (1.0, 5.0)):
        c = Campaign(window=Window(hours="08:00-18:00"), retries=RETRIES, max_concurrent=cap, calls_per_second=cps)
        s = sch.Scheduler(c, contacts(*rnd.choices(["UTC", "Asia/Tokyo", "America/Chicago"], k=12)))
        t = at("2026-12-03T00:00:00+00:00")
        active: dict[int, float] = {}
        dial_times: list[float] = []
        for _ in range(5000):
            d = s.next(t)
            if isinstance(d, sch.Done):
                break
            if isinstance(d, sch.Dial):
                assert s.window_open(d.contact, t)
                assert len(active) < cap
                s.started(d.contact.row, t)
                active[d.contact.row] = t + rnd.uniform(1, 120)
                dial_times.append(t)
                continue
            ends = sorted(active.items(), key=lambda kv: kv[1])
            nxt = d.until if isinstance(d, sch.Wait) and d.until is not None else None
            if ends and (nxt is None or ends[0][1] <= nxt):
                row, t = ends[0][0], max(t, ends[0][1])
                del active[row]
                s.finished(row, rnd.choice(outcomes), t)
            else:
                assert nxt is not None and nxt > t
                t = nxt
        else:
            raise AssertionError("the campaign never ended")
        assert all(b - a >= 1 / cps - 1e-9 for a, b in zip(dial_times, dial_times[1:]))
        assert all(st.done for st in s.states.values())
