"""How much of the engine's audio may wait in a call's tx ring, and when a lasting backlog is cut.

Why a module of its own: audio queued in tx is delay the caller hears for the rest of the call. Two
rules bound it: a limit that trims each push (`max_ms`), and a one-time cut of a backlog that proved
unneeded (`settle_pushes`). Their logic and every number they use live here, each with its reason, so
the runner, the echo line and the inference process cannot drift apart. CallAudio applies the policy
on every push (engine thread only; nothing here blocks or locks).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from callbot.engine.audio import Ring

MEDIA_TICK_MS = 20  # ms: pjmedia's clock reads one frame this long out of tx per tick
# ms that may stay queued beyond the frame just pushed: two media ticks absorb a step that ends just after
# a tick; beyond that an underrun or a fed-silence frame would add delay for the rest of the call
TX_SLACK_MS = 2.0 * MEDIA_TICK_MS
# ms of history whose every push must show a lasting backlog, with time to spare, before it is cut: a
# step slower than usual once in a hundred frames must keep the backlog that absorbs it (BENCHMARKS.md,
# "Cadence soak": a 1 s window cut and re-earned it by an underrun every 20-30 s; "Underruns no longer
# ratchet the delay": 4 and 12 pushes were tried)
SETTLE_WINDOW_MS = 10_000
# ms by which every recent push must have come before the media tick that read it, beyond the backlog
# it found, for that backlog to be cut: steps vary by a few ms from frame to frame
SETTLE_MARGIN_MS = 4.0

MODEL_FRAME_MS = 80  # ms: one step of the model (1920 samples at 24 kHz)
ECHO_FRAME_MS = MEDIA_TICK_MS  # ms: the echo line's default frame (480 samples at 24 kHz)


def tx_limit_ms(frame_ms: float) -> float:
    """The tx limit, in ms, for an engine that pushes frames of `frame_ms` ms."""
    return frame_ms + TX_SLACK_MS


MODEL_TX_MAX_MS = tx_limit_ms(MODEL_FRAME_MS)  # 120 ms
MODEL_TX_SETTLE_PUSHES = SETTLE_WINDOW_MS // MODEL_FRAME_MS  # 125 pushes of 80 ms
ECHO_TX_SETTLE_PUSHES = SETTLE_WINDOW_MS // ECHO_FRAME_MS  # 500 pushes of 20 ms


class TxPolicy:
    """One call's tx policy at `call_rate` Hz: `admit` trims each push, `note_push` remembers it.

    `max_ms` (ms, or None: no limit): every underrun (silence played while the engine was late) and
    every extra frame an engine pushes (silence fed by a watchdog, then the late audio too) would
    otherwise stay in tx for the rest of the call as added delay. A push that would leave more than
    this queued drops the oldest samples of what it brings instead.

    `settle_pushes` (pushes, or None: never): a push that finds audio of earlier pushes still queued in
    tx delays all of its own audio by that much: after an underrun the media side plays the late audio
    one tick later, and every later push finds the previous one's tail still queued ("the ratchet"),
    for the rest of the call. When each of the last `settle_pushes` pushes found a backlog, AND each of
    them reached tx at least that backlog + SETTLE_MARGIN_MS before the tick that read it (so the engine
    would have been in time without the backlog: its steps do not end on both sides of a tick), the
    smallest backlog is dropped from the start of this push, once: one cut instead of that delay
    forever. A step time that straddles a tick keeps the backlog: a later phase that holds beats an
    underrun and a cut every few frames.
    """

    def __init__(self, call_rate: int, max_ms: float | None, settle_pushes: int | None, ring_ms: float):
        if max_ms is not None and not 0 < max_ms <= ring_ms:
            raise ValueError(f"tx_max_ms must be in (0, {ring_ms:g}] ms, got {max_ms!r}")
        if settle_pushes is not None and (isinstance(settle_pushes, bool) or not isinstance(settle_pushes, int)
                                          or settle_pushes < 1):
            raise ValueError(f"tx_settle must be an int >= 1 (pushes) or None, got {settle_pushes!r}")
        self.call_rate = call_rate
        self.max_samples = None if max_ms is None else int(call_rate * max_ms / 1000)  # call-rate samples
        self.settle_pushes = settle_pushes
        self.trimmed = 0  # call-rate samples dropped by the limit, or to settle
        self.settled = 0  # times a backlog was cut
        # per push: [tx position, push ns, backlog found, wait until the media side read it (ns; None until
        # known)]
        self._recent: deque = deque(maxlen=settle_pushes or 1)

    def admit(self, out: np.ndarray, tx: Ring, departure_ns: Callable[[int], int],
              whole: bool = False) -> tuple[np.ndarray, int]:
        """(what of `out`, call-rate samples about to enter `tx`, may go in; the backlog it found).
        `departure_ns` is CallAudio's: when the media side read a tx position. `whole`: `out` is a
        frame of a clip the app plays, which reaches the caller whole, late rather than cut (a round
        that caught up after a stall would otherwise cut the clip); the next push that is not whole is
        held to the limit again, so the delay does not stay."""
        backlog = tx.readable  # a snapshot: the media side only lowers it
        if whole:
            return out, backlog
        if self.settle_pushes is not None and len(out):
            drop = min(self._settle_cut(backlog, departure_ns), len(out))
            if drop:
                out = out[drop:]
                self.trimmed += drop
                self.settled += 1
                self._recent.clear()
        if self.max_samples is not None:
            excess = tx.readable + len(out) - self.max_samples
            if excess > 0:
                drop = min(excess, len(out))
                out = out[drop:]
                self.trimmed += drop
        return out, backlog

    def note_push(self, pos: int, push_ns: int, backlog: int) -> None:
        """A push's audio entered tx at position `pos` at `push_ns`, finding `backlog` samples queued."""
        if self.settle_pushes is not None:
            self._recent.append([pos, push_ns, backlog, None])

    def _settle_cut(self, backlog: int, departure_ns: Callable[[int], int]) -> int:
        """Call-rate samples to cut from this push: 0 unless the last `settle_pushes` pushes all found a
        backlog and all left tx early enough to have done without it."""
        for entry in self._recent:  # each push's wait is learnt once, on the first push after it left
            if entry[3] is None:
                left_ns = departure_ns(entry[0])
                # -1 (its stamp is gone) is asked again too: it blocks a cut until it leaves the window
                if left_ns > 0:
                    entry[3] = left_ns - entry[1]
        if len(self._recent) < self.settle_pushes:
            return 0
        lasting = min(backlog, *(e[2] for e in self._recent))
        if lasting <= 0:
            return 0
        waits = [e[3] for e in self._recent]
        if any(w is None for w in waits):
            return 0  # not read yet, or no evidence
        spare_ns = min(waits) - lasting * 1_000_000_000 // self.call_rate
        return lasting if spare_ns >= SETTLE_MARGIN_MS * 1e6 else 0
