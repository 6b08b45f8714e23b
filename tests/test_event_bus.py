"""The app's event bus: fan-out, bounded queues with counted drops, handlers on their own threads."""
from __future__ import annotations

import threading

import pytest

from callbot.app.event_bus import EventBus


def test_every_subscriber_gets_every_event_in_order():
    bus: EventBus[int] = EventBus()
    subs = [bus.subscribe(f"s{i}") for i in range(3)]
    for i in range(100):
        bus.publish(i)
    for sub in subs:
        assert [sub.get(0) for _ in range(100)] == list(range(100))
        assert sub.get(0) is None and sub.dropped == 0 and sub.delivered == 100


def test_a_full_subscriber_drops_and_counts_without_blocking_the_publisher_or_the_others():
    bus: EventBus[int] = EventBus()
    slow = bus.subscribe("slow", maxsize=10)
    fast = bus.subscribe("fast", maxsize=1000)
    for i in range(500):
        bus.publish(i)  # returns at once: nobody reads `slow`
    assert slow.dropped == 490 and slow.pending == 10
    assert [slow.get(0) for _ in range(10)] == list(range(10))  # it keeps its oldest, loses the newest
    assert fast.dropped == 0 and fast.pending == 500


def test_a_filter_keeps_what_a_subscriber_does_not_want_out_of_its_queue():
    bus: EventBus[int] = EventBus()
    even = bus.subscribe("even", maxsize=5, accept=lambda e: e % 2 == 0)
    for i in range(10):
        bus.publish(i)
    assert [even.get(0) for _ in range(5)] == [0, 2, 4, 6, 8] and even.dropped == 0


def test_handlers_run_on_their_own_threads_and_a_failing_one_goes_on():
    bus: EventBus[int] = EventBus()
    seen: list[tuple[int, str]] = []
    release = threading.Event()

    def blocked(e: int) -> None:
        release.wait(10)  # a subscriber stuck on I/O
        seen.append((e, threading.current_thread().name))

    def failing(e: int) -> None:
        if e == 1:
            raise RuntimeError("boom")
        seen.append((e, "failing"))

    stuck = bus.attach("blocked", blocked)
    flaky = bus.attach("failing", failing)
    for i in range(3):
        bus.publish(i)  # neither handler can hold the publisher up
    release.set()
    bus.close(timeout=10)  # finishes what was published before it
    assert sorted(e for e, who in seen if who == "bus-blocked") == [0, 1, 2]
    assert sorted(e for e, who in seen if who == "failing") == [0, 2]
    assert flaky.errors == 1 and stuck.errors == 0 and bus.subscriptions == ()


def test_close_drains_what_was_queued_and_stops_the_handler_threads():
    bus: EventBus[int] = EventBus()
    got: list[int] = []
    bus.attach("collect", got.append)
    for i in range(1000):
        bus.publish(i)
    bus.close(timeout=10)
    assert got == list(range(1000))
    assert not any(t.name == "bus-collect" for t in threading.enumerate())


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_queue_sizes_are_refused(size):
    with pytest.raises(ValueError, match="maxsize"):
        EventBus().subscribe("x", maxsize=size)


def test_an_event_published_in_answer_to_another_reaches_every_subscriber_after_it():
    """A handler that publishes on an event (the flow host starting a flow on its call's event) must not
    overtake that event on its way to the subscribers after it (the call store would see the flow before
    the call). The late subscriber's filter holds the first publish open while the answer is published."""
    bus: EventBus[str] = EventBus()
    answered = threading.Event()

    def answer(e: str) -> None:
        if e == "call":
            bus.publish("flow")
            answered.set()

    def late(e: str) -> bool:
        if e == "call":
            answered.wait(0.3)  # without one publish at a time, "flow" reaches `watch` in this window
        return True

    bus.attach("flows", answer)
    watch = bus.subscribe("store", accept=late)
    bus.publish("call")
    assert answered.wait(10)
    assert [watch.get(10), watch.get(10)] == ["call", "flow"]
    bus.close(timeout=10)
