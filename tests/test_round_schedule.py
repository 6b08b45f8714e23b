"""The round schedule (engine/serving/round_schedule.py) as pure functions, over every combination of a
grid of inputs: when a round starts given the media clock's tick phase, the expected round length and
the calls' due times; which calls it takes; the majority phase across clocks; a new call's first-frame
pad; the expected round length learnt from the rounds seen."""
from __future__ import annotations

import itertools

import pytest

from callbot.engine.serving.round_schedule import (FRAME_NS, TICK_NS, Due, RoundTimes, first_frame_pad,
                                                   first_frame_tick, majority_phase, next_tick, plan_round)

MS = 1_000_000
T0 = 10_000 * MS  # an arbitrary monotonic origin


def fixed(ns):
    return lambda batch: ns


def test_next_tick_is_the_first_grid_point_at_or_after():
    for grid in range(T0, T0 + TICK_NS, MS // 2):
        for t in range(T0 - 3 * TICK_NS, T0 + 3 * TICK_NS, MS // 4):
            tick = next_tick(grid, t)
            assert t <= tick < t + TICK_NS and (tick - grid) % TICK_NS == 0


def test_a_round_ends_on_the_first_tick_it_can_reach_and_starts_as_late_as_that_allows():
    for phase, due_in_tick, expected, margin, late in itertools.product(
            range(0, 20, 3), range(0, 20, 2), range(0, 70, 3), (0, 2, 3), (0, 1, 15, 45)):
        grid = T0 + phase * MS
        due = grid + due_in_tick * MS
        now = due + late * MS
        plan = plan_round(now, [Due(due, grid)], fixed(expected * MS), margin * MS)
        end, start = plan.end_tick_ns, plan.start_ns
        assert plan.members == (0,)
        assert (end - grid) % TICK_NS == 0  # a tick of the call's clock
        assert start == end - (expected + margin) * MS  # ends `margin` before it, as expected
        assert start >= due  # never before its frame came
        assert end - TICK_NS < due + (expected + margin) * MS  # no tick earlier would do: the first one
        # the wait after the round for the tick: the margin, whatever the step takes
        assert end - (start + expected * MS) == margin * MS


def test_without_a_tick_or_a_round_length_every_waiting_call_goes_at_once():
    calls = [Due(T0 + 5 * MS, 0), Due(T0, 0), Due(T0 + 30 * MS, 0)]
    for plan in (plan_round(T0 + 40 * MS, calls, fixed(10 * MS)),
                 plan_round(T0 + 40 * MS, [Due(c.due_ns, T0) for c in calls], fixed(None))):
        assert plan.start_ns == T0 + 40 * MS and plan.members == (0, 1, 2) and plan.end_tick_ns == 0
    assert plan_round(T0, [], fixed(MS)) is None


def test_calls_due_later_join_only_while_the_round_still_ends_before_its_tick():
    # the first call is due on a tick; another falls due `later` ms after it; a round of n calls takes
    # 5 + 4n ms; margin 2 ms
    def length(n):
        return (5 + 4 * n) * MS

    for later, first_phase in itertools.product(range(0, 40), range(0, 20, 4)):
        grid = T0 + first_phase * MS
        first, second = Due(grid, grid), Due(grid + later * MS, grid + later * MS)
        plan = plan_round(grid + later * MS, [second, first], length, 2 * MS)
        end = plan.end_tick_ns
        alone_end = next_tick(grid, grid + length(1) + 2 * MS)
        assert 1 in plan.members
        if later * MS <= 2 * MS:  # the same tick: one round from the start
            assert plan.members == (0, 1)
            assert end == next_tick(grid, grid + later * MS + length(2) + 2 * MS)
        else:
            assert end == alone_end  # the first call's tick is not moved by a late joiner
            joins = grid + later * MS + length(2) + 2 * MS <= end
            assert plan.members == ((0, 1) if joins else (1,))
        assert plan.start_ns == end - length(len(plan.members)) - 2 * MS
        assert plan.start_ns >= max((first, second)[1 - i].due_ns for i in plan.members)


def test_a_round_across_clocks_aims_at_the_majority_phase():
    # three calls on one clock (phase 0), one on a clock 7 ms later, all due on their ticks
    a = [Due(T0, T0), Due(T0, T0 + 80 * MS), Due(T0 + MS // 2, T0 - 80 * MS)]
    b = Due(T0 + 7 * MS, T0 + 7 * MS)
    for calls in (a + [b], [b] + a):
        plan = plan_round(T0 + 7 * MS, calls, fixed(9 * MS), 2 * MS)
        assert (plan.end_tick_ns - T0) % TICK_NS == 0  # the three's clock
        assert plan.end_tick_ns == T0 + 20 * MS and plan.start_ns == T0 + 9 * MS
        assert len(plan.members) == 4  # the other clock's call fits in: one round, not two


def test_majority_phase_over_every_small_mix_of_clocks():
    phases = (0, 1, 7, 13, 19)  # ms; 0, 1 and 19 are one grid within the 2 ms tolerance (around the circle)
    for combo in itertools.combinations_with_replacement(phases, 4):
        ticks = [T0 + p * MS + k * TICK_NS for k, p in enumerate(combo)]
        got = majority_phase(ticks)
        assert got in ticks

        def on(grid, t):
            d = (t - grid) % TICK_NS
            return min(d, TICK_NS - d) <= 2 * MS

        best = max(sum(on(g, t) for t in ticks) for g in ticks)
        assert sum(on(got, t) for t in ticks) == best
    with pytest.raises(ValueError):
        majority_phase([])


def frame_ticks(made: int, pad: int, last_tick: int, per_tick: int = 480, frame: int = 1920, count: int = 3):
    """The ticks on which a call's frames complete: `made` samples by `last_tick`, `per_tick` more each
    tick after, `pad` samples of silence in front."""
    out, have, t = [], made + pad, last_tick
    done = have // frame
    while len(out) < count:
        t += TICK_NS
        have += per_tick
        if have // frame > done:
            done = have // frame
            out.append(t)
    return out


def test_a_new_calls_first_frame_pad_puts_its_frames_on_the_groups_tick_or_one_tick_before():
    for made_ticks, own_phase, group_offset in itertools.product(range(0, 9), range(0, 20, 3), range(0, 80, 1)):
        made = made_ticks * 480
        last = T0 + own_phase * MS
        group = last + group_offset * MS - 3 * FRAME_NS  # a frame tick of the group, some frames ago
        pad = first_frame_pad(made, last, group)
        assert 0 <= pad < 1920 and pad % 480 == 0
        ticks = frame_ticks(made, pad, last)
        assert first_frame_tick(made, pad, last) == (last if made + pad and (made + pad) % 1920 == 0 else ticks[0])
        for t in ticks:
            lead = (group - t) % FRAME_NS  # how long before the group's next frame tick it completes
            assert lead < TICK_NS or lead >= FRAME_NS - 2 * MS, (made, own_phase, group_offset, pad)
        if group_offset % 20 == 0:  # one clock: exactly on the group's tick
            assert all((group - t) % FRAME_NS == 0 for t in frame_ticks(made, pad, last))


def test_stamps_of_one_tick_a_little_apart_count_as_that_tick():
    # one process: the group's frame tick and the new call's tick are the same ticks, stamped
    # microseconds apart in either order
    for made_ticks, ticks_ahead, jitter_us in itertools.product(range(0, 5), range(0, 4), (-1500, -3, 0, 3, 1500)):
        made = made_ticks * 480
        group = T0 + ticks_ahead * TICK_NS + jitter_us * 1000
        pad = first_frame_pad(made, T0, group)
        assert (made + pad + ticks_ahead * 480) % 1920 == 0, (made_ticks, ticks_ahead, jitter_us)


def test_pad_for_a_count_off_the_tick_still_ends_its_frames_on_a_tick():
    for made in range(0, 3000, 37):
        pad = first_frame_pad(made, T0, T0 + 40 * MS)
        assert (made + pad + 2 * 480) % 1920 == 0
        assert first_frame_tick(made, pad, T0) == T0 + 40 * MS


def test_round_times_expects_the_longest_recent_round_by_default():
    times = RoundTimes(window=4)
    for ns in (9, 5, 6, 7):
        times.observe(1, ns * MS)
    assert times.expected_ns(1) == 9 * MS
    times.observe(1, 6 * MS)  # the 9 ms round leaves the window
    assert times.expected_ns(1) == 7 * MS
    times.observe(1, FRAME_NS + 1)  # a stall, not a round length to plan by
    assert times.expected_ns(1) == 7 * MS


def test_round_times_expects_a_high_percentile_of_the_recent_rounds_and_scales_unseen_sizes():
    times = RoundTimes(window=10, quantile=90.0)
    assert times.expected_ns(1) is None
    for ns in range(1, 11):
        times.observe(2, ns * MS)
    assert times.expected_ns(2) == int(9.1 * MS)
    assert times.expected_ns(4) == 2 * times.expected_ns(2)  # linear from the nearest size seen
    assert times.expected_ns(1) == times.expected_ns(2) // 2
    for _ in range(10):
        times.observe(2, MS)  # the old rounds leave the window
    assert times.expected_ns(2) == MS
    with pytest.raises(ValueError):
        times.observe(0, MS)
    with pytest.raises(ValueError):
        RoundTimes(window=0)
