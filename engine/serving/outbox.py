"""The model service's queue of words for one worker: bounded, and never blocking whoever puts.

Why not queue.Queue(maxsize): a full Queue either blocks the putter (here the inference thread, which
steps every worker's calls: one worker that stops reading would stall them all) or refuses the newest
word, which may be the one that matters (a call's summary, an admission). So a full outbox drops the
oldest word of least value first: a call's FrameStages (per-frame timing stamps, about one a second per
call: statistics, the call does not need them), then other live events; words the worker waits for or
acts on (Ready, Admission, OpenRefused, CallClosed, a call's SessionClosed, ChildFailed, Pong) are never
dropped, and so may take the queue past its limit (they are bounded by what the worker asked). Drops
are counted by kind. A worker that stops reading for longer than the heartbeat allows is dropped by the
service anyway (engine/serving/heartbeat.py): the limit only has to hold that long.
"""
from __future__ import annotations

import collections
import threading

LOW, EVENT, ESSENTIAL = 0, 1, 2  # what a word is worth: dropped first, dropped next, never dropped
OUTBOX_LIMIT = 1000  # words queued for one worker (a few calls' events for many seconds)


class Outbox:
    """put(msg, worth) from any thread, never blocking; get() by the one sending thread; close() ends it."""

    def __init__(self, limit: int = OUTBOX_LIMIT):
        if limit < 1:
            raise ValueError(f"an outbox holds at least one word, not {limit}")
        self.limit = limit
        self._items: collections.deque = collections.deque()  # (worth, kind, msg)
        self._worth = [0, 0, 0]  # queued words by worth
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped: dict[str, int] = {}  # by kind (the dropped word's name)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, msg, worth: int = ESSENTIAL, kind: str | None = None) -> None:
        kind = kind or type(msg).__name__
        with self._cond:
            if self._closed:
                return
            if len(self._items) >= self.limit and worth != ESSENTIAL and not self._drop_older(worth):
                self._count(kind)  # only essential words queued: the newcomer is the cheapest
                return
            self._items.append((worth, kind, msg))
            self._worth[worth] += 1
            self._cond.notify()

    def _drop_older(self, incoming: int) -> bool:
        """Makes room for a word worth `incoming` by dropping the oldest LOW word, else (for an EVENT) the
        oldest EVENT; False when there is none."""
        for worth in (LOW, EVENT):
            if worth > incoming or not self._worth[worth]:
                continue
            for i, (w, kind, _) in enumerate(self._items):
                if w == worth:
                    del self._items[i]
                    self._worth[worth] -= 1
                    self._count(kind)
                    return True
        return False

    def _count(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1

    def get(self):
        """The next word (blocking), or None once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            worth, _, msg = self._items.popleft()
            self._worth[worth] -= 1
            return msg

    def close(self) -> None:
        """No more words: get() returns what is queued, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def dropped_total(self) -> int:
        with self._cond:
            return sum(self.dropped.values())

