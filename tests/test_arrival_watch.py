"""When the inference thread looks at its calls' audio (engine/serving/arrival_watch.py): pure times."""
from callbot.engine.serving.arrival_watch import (FINE_NS, FRAME_NS, LEAD_NS, SPAN_NS, expected_arrival_ns,
                                                  next_look_ns)

MS = 1_000_000


def test_expected_arrival_is_the_next_frame_after_the_last_one():
    grid = 1_000 * MS
    assert expected_arrival_ns(grid, grid) == grid + FRAME_NS
    assert expected_arrival_ns(grid, grid + 50 * MS) == grid + FRAME_NS
    # late but inside its window: still the same arrival
    assert expected_arrival_ns(grid, grid + FRAME_NS + SPAN_NS - 1) == grid + FRAME_NS


def test_a_frame_that_did_not_come_moves_the_watch_to_the_next_grid_point():
    grid = 1_000 * MS
    assert expected_arrival_ns(grid, grid + FRAME_NS + SPAN_NS) == grid + 2 * FRAME_NS
    assert expected_arrival_ns(grid, grid + 10 * FRAME_NS + SPAN_NS + 1) == grid + 11 * FRAME_NS


def test_fine_looks_inside_the_window_only():
    arrival = 2_000 * MS
    coarse = arrival + 10 * MS  # far: the window decides
    assert next_look_ns(arrival - LEAD_NS, coarse, [arrival]) == arrival - LEAD_NS + FINE_NS
    assert next_look_ns(arrival + 3 * MS, coarse, [arrival]) == arrival + 3 * MS + FINE_NS
    # closed: back to the coarse poll
    assert next_look_ns(arrival + SPAN_NS, coarse, [arrival]) == coarse


def test_before_a_window_the_look_is_at_its_opening_or_the_coarse_poll_whichever_first():
    arrival = 2_000 * MS
    assert next_look_ns(arrival - 5 * MS, arrival, [arrival]) == arrival - LEAD_NS
    assert next_look_ns(arrival - 5 * MS, arrival - 4 * MS, [arrival]) == arrival - 4 * MS


def test_the_coarse_poll_is_never_passed_by_a_fine_look():
    arrival = 2_000 * MS
    now = arrival
    assert next_look_ns(now, now + FINE_NS // 2, [arrival]) == now + FINE_NS // 2


def test_several_calls_the_nearest_window_counts():
    now = 5_000 * MS
    early, inside = now + 3 * MS, now + 200_000
    assert next_look_ns(now, now + MS, [early, inside]) == now + FINE_NS
    assert next_look_ns(now, now + 10 * MS, [now + 6 * MS, early]) == early - LEAD_NS
    assert next_look_ns(now, now + MS, []) == now + MS
