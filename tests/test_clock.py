"""PeriodicClock and sleep_until: deadlines sit on an absolute grid, missed periods are counted and
never replayed, and bad input is refused. No timing thresholds here: how late a wake is belongs to
bench/bench_clock.py."""
import signal
import threading
import time

import pytest

from callbot.engine import PeriodicClock, now_ns, sleep_until

PERIOD_MS = 5
PERIOD_NS = PERIOD_MS * 1_000_000


def wait_and_check(clock: PeriodicClock) -> int:
    """One wait, checked against the grid; returns the deadline it served."""
    before, missed_before = clock.deadline_ns, clock.missed
    late = clock.wait()
    woke = now_ns()
    served = before + (clock.missed - missed_before) * clock.period_ns
    assert served == clock.start_ns + (clock.ticks + clock.missed) * clock.period_ns
    assert clock.deadline_ns == served + clock.period_ns
    assert late >= 0
    assert woke >= served + late  # the wake really came after the deadline it reports
    return served


def test_now_ns_is_time_monotonic_ns():
    a = time.monotonic_ns()
    b = now_ns()
    c = time.monotonic_ns()
    assert a <= b <= c


def test_deadlines_are_absolute_over_200_periods():
    n = 200
    clock = PeriodicClock(PERIOD_MS)
    start = clock.start_ns
    assert clock.period_ns == PERIOD_NS
    assert clock.deadline_ns == start + PERIOD_NS
    served = []
    while clock.ticks + clock.missed < n:
        served.append(wait_and_check(clock))
    # the n-th deadline is exactly n periods after the start: nothing accumulated
    assert served[-1] == start + n * PERIOD_NS
    assert all((d - start) % PERIOD_NS == 0 for d in served)
    assert served == sorted(set(served))
    assert now_ns() - start >= n * PERIOD_NS


def test_a_late_iteration_does_not_shift_the_grid():
    n = 40
    clock = PeriodicClock(PERIOD_MS)
    start = clock.start_ns
    served = []
    while clock.ticks + clock.missed < n:
        served.append(wait_and_check(clock))
        if clock.ticks == 10:
            missed_before = clock.missed
            # 3.5 periods of extra work: at the next wait its deadline is >= 2.5 periods old
            time.sleep(3.5 * PERIOD_MS / 1000)
            served.append(wait_and_check(clock))
            assert clock.missed - missed_before >= 2  # dropped, not replayed in a burst
    assert served[-1] == start + n * PERIOD_NS
    assert all((d - start) % PERIOD_NS == 0 for d in served)
    assert len(served) == clock.ticks == n - clock.missed
    assert now_ns() - start >= n * PERIOD_NS


def test_skip_to_now_drops_every_passed_grid_point():
    clock = PeriodicClock(PERIOD_MS)
    start = clock.start_ns
    time.sleep(3.5 * PERIOD_MS / 1000)
    t0 = now_ns()
    dropped = clock.skip_to_now()
    t1 = now_ns()
    assert dropped >= 3
    assert clock.missed == dropped and clock.ticks == 0
    assert clock.deadline_ns == start + (dropped + 1) * PERIOD_NS
    assert clock.deadline_ns > t0  # the next deadline is in the future of the call...
    assert clock.deadline_ns - PERIOD_NS <= t1  # ...and the one before it had passed


def test_skip_to_now_on_time_drops_nothing():
    clock = PeriodicClock(PERIOD_MS, start_ns=now_ns() + 10**9)
    deadline = clock.deadline_ns
    assert clock.skip_to_now() == 0
    assert clock.deadline_ns == deadline and clock.missed == 0


def test_reset_moves_the_grid_origin():
    clock = PeriodicClock(PERIOD_MS)
    clock.wait()
    origin = now_ns() + 2 * PERIOD_NS
    clock.reset(start_ns=origin)
    assert (clock.start_ns, clock.ticks, clock.missed) == (origin, 0, 0)
    assert clock.deadline_ns == origin + PERIOD_NS
    assert wait_and_check(clock) == origin + PERIOD_NS
    before = now_ns()
    clock.reset()
    assert before <= clock.start_ns <= now_ns()


def test_fractional_period_is_rounded_to_whole_ns():
    clock = PeriodicClock(0.0125, start_ns=0)
    assert clock.period_ns == 12_500
    assert clock.deadline_ns == 12_500


def test_sleep_until_reaches_the_deadline():
    deadline = now_ns() + 2 * PERIOD_NS
    late = sleep_until(deadline)
    assert late >= 0
    assert now_ns() >= deadline + late


def test_sleep_until_a_past_deadline_reports_how_late():
    deadline = now_ns()
    late = sleep_until(deadline - PERIOD_NS)
    assert late >= PERIOD_NS


needs_sigalrm = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM timers")


@needs_sigalrm
def test_a_handled_signal_neither_ends_nor_restarts_the_wait():
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *_: calls.append(now_ns()))
    try:
        clock = PeriodicClock(100)
        deadline = clock.deadline_ns
        signal.setitimer(signal.ITIMER_REAL, 0.02)  # fires inside the wait
        clock.wait()
        woke = now_ns()
        deadline2 = now_ns() + 100_000_000
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        sleep_until(deadline2)
        woke2 = now_ns()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(calls) == 2
    assert calls[0] < deadline and calls[1] < deadline2  # the handlers ran mid-wait...
    assert woke >= deadline and woke2 >= deadline2  # ...and the waits still reached their deadlines
    assert clock.ticks == 1 and clock.deadline_ns == deadline + clock.period_ns


@needs_sigalrm
def test_an_exception_from_a_signal_handler_interrupts_the_wait():
    class Interrupted(Exception):
        pass

    def handler(*_):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        clock = PeriodicClock(60_000)
        deadline = clock.deadline_ns
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Interrupted):
            clock.wait()  # would sleep a minute if the signal could not reach Python
        assert now_ns() < deadline
        assert clock.ticks == 0 and clock.deadline_ns == deadline  # the grid did not move
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Interrupted):
            sleep_until(now_ns() + 60 * 10**9)
        clock.skip_to_now()  # usable again: the interrupted wait released the clock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_wait_releases_the_gil():
    count = 0
    stop = threading.Event()

    def spin():
        nonlocal count
        while not stop.is_set():
            count += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        clock = PeriodicClock(100)
        before = count
        clock.wait()
        during = count - before
    finally:
        stop.set()
        spinner.join()
    assert during > 0  # the pure-Python spinner ran while wait() slept


def test_a_clock_refuses_a_second_waiting_thread():
    clock = PeriodicClock(1000)
    entered = threading.Event()
    errors = []

    def waiter():
        entered.set()
        clock.wait()

    t = threading.Thread(target=waiter)
    t.start()
    entered.wait()
    # the waiter is inside wait() (or about to be); poll until a second wait() is refused
    while t.is_alive():
        try:
            clock.skip_to_now()
        except RuntimeError as e:
            errors.append(str(e))
            break
        time.sleep(0.001)
    t.join()
    assert errors and "one thread" in errors[0]


@pytest.mark.parametrize("period", [0, -5, float("nan"), float("inf"), "20", None, True, 3_600_001, 1e-7])
def test_bad_period_raises_value_error(period):
    with pytest.raises(ValueError, match="period_ms"):
        PeriodicClock(period)


@pytest.mark.parametrize("value", [-1, 1.5, "0", True, 2**63])
def test_bad_times_raise_value_error(value):
    with pytest.raises(ValueError, match="deadline_ns"):
        sleep_until(value)
    with pytest.raises(ValueError, match="start_ns"):
        PeriodicClock(PERIOD_MS, start_ns=value)
    with pytest.raises(ValueError, match="start_ns"):
        PeriodicClock(PERIOD_MS).reset(start_ns=value)
