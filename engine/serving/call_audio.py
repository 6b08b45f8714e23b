"""One call's audio as the engine sees it: two rings at the call's rate, and 24 kHz frames in and out.

Why: the media callback (pjmedia clock thread) may only copy PCM into and out of rings; everything
slower (resampling to and from the model's 24 kHz, framing) happens on the engine's thread here. The
rx ring is filled by the media callback and drained by `pull`; the tx ring is filled by `push` and
drained by the media callback. Each ring has one producer and one consumer, so no locks anywhere.

    media callback ──> rx (call rate) ──pull──> Resampler(call_rate, 24000) ──> 24 kHz frames ──> engine
    engine ──> 24 kHz frames ──push──> Resampler(24000, call_rate) ──> tx (call rate) ──> media callback

All samples are int16 (what the phone line carries); an engine that wants float32 converts its frames.

Across two processes (BENCHMARKS.md "Media callback": inference leaves the SIP process), rx and tx live
in one shared_memory block: the SIP side creates it with `CallAudio.shared` (a `SharedCallRings`: rx and
tx only, no resamplers, no engine thread) and the inference process opens the same block by name with
`CallAudio.attach_engine_side`, which owns the resamplers and the 24 kHz ring. The SIP side created the
block, so it alone unlinks it, after both sides are done or the other side is gone.

When audio crossed the media side: beside each ring lies a StampLog (ext/stamps.h; in the shared block
too), to which the media callback appends (samples so far, monotonic ns) once per callback, lock-free.
`pull` maps the frame it returns to when its last sample entered rx (`last_arrival_ns`) and when the
resampler made it (`last_resampled_ns`), `push` notes
where its audio starts in tx (`last_push_pos`), and `departure_ns(pos)` answers, once the media side has
read that far, when that sample left tx: the first and last stages of the runner's FrameStats.
"""

from __future__ import annotations

import math
from collections import deque
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from callbot.engine.audio import Resampler, Ring, now_ns
from callbot.engine.audio._stamps import NBYTES as _STAMP_BYTES
from callbot.engine.audio._stamps import StampLog
from callbot.engine.audio.ring import capacity_for

ENGINE_RATE = 24000  # Hz: Mimi's rate, the model's only rate
CALL_RATES = (8000, 16000, 24000)  # Hz a call's media port may run at (the resampler's designs)
RING_SECONDS = 2.0  # capacity of each ring: enough to ride out a stalled engine for this long
# how early, at least, every recent push must have come before the media tick that read it, beyond the
# backlog it found, for that backlog to be cut (`tx_settle`): steps vary by a few ms from frame to frame
SETTLE_MARGIN_MS = 4.0


def _check_rate(call_rate) -> None:
    if isinstance(call_rate, bool) or not isinstance(call_rate, int) or call_rate not in CALL_RATES:
        raise ValueError(f"call_rate must be one of {CALL_RATES} Hz, got {call_rate!r}")


_LINE = 128  # tx starts on its own cache line (and 8-byte aligned, as the ring's indices need)


def _tx_offset(capacity: int) -> int:
    return -(-Ring.nbytes(capacity, "int16") // _LINE) * _LINE


_STAMPS_SPAN = -(-_STAMP_BYTES // _LINE) * _LINE


def _block_size(capacity: int) -> int:
    return 2 * _tx_offset(capacity) + 2 * _STAMPS_SPAN


def _block_views(buf: memoryview, capacity: int) -> list[memoryview]:
    """A shared block's parts, in order: rx, tx, then the rx and tx stamp logs, each on its own line."""
    off = _tx_offset(capacity)
    st = 2 * off
    return [buf[:off], buf[off:st], buf[st:st + _STAMPS_SPAN], buf[st + _STAMPS_SPAN:]]


class SharedCallRings:
    """The media side of a call whose engine runs in another process: rx and tx in one shared_memory block,
    with the media side's stamp logs (`rx_stamps`, `tx_stamps`) after them.

    `shm_name` is what the other process passes to `CallAudio.attach_engine_side`. `close()` closes and
    unlinks the block (this side created it); call it once the media port is off the bridge. The other
    side may still have it open then: its mapping stays valid until it closes it or exits.
    """

    def __init__(self, call_rate: int, ring_seconds: float = RING_SECONDS):
        _check_rate(call_rate)
        if not ring_seconds > 0:
            raise ValueError(f"ring_seconds must be > 0, got {ring_seconds!r}")
        self.call_rate = call_rate
        self.frame_samples = call_rate // 50
        capacity = capacity_for(int(call_rate * ring_seconds))
        self._shm = shared_memory.SharedMemory(create=True, size=_block_size(capacity))
        self.shm_name = self._shm.name
        self._views = _block_views(self._shm.buf, capacity)
        self.rx = Ring.create_in(self._views[0], capacity, "int16")
        self.tx = Ring.create_in(self._views[1], capacity, "int16")
        # the media side writes these (MediaPump, or `note` from a test's media thread)
        self.rx_stamps = StampLog.create_in(self._views[2])
        self.tx_stamps = StampLog.create_in(self._views[3])

    @property
    def underruns(self) -> int:
        return self.tx.underruns

    @property
    def overruns(self) -> int:
        return self.rx.overruns + self.tx.overruns

    @property
    def closed(self) -> bool:
        return self._shm is None

    def close(self) -> None:
        """Closes the rings and the block and unlinks it; safe to call more than once."""
        _release((self.rx, self.tx, self.rx_stamps, self.tx_stamps), self._views, self._shm, unlink=True)
        self._shm = None


def _release(users: tuple, views: list, shm, unlink: bool) -> None:
    for user in users:  # rings and stamp logs: each holds its view until closed
        if not user.closed:
            user.close()
    for view in views:
        view.release()
    if shm is not None:
        shm.close()
        if unlink:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass  # gone already (unlinked by hand, or by the resource tracker at a crash)


class CallAudio:
    """Rings and resamplers of one call at `call_rate` Hz (the media port's rate).

    The media side uses `rx` (write) and `tx` (read) from the pjmedia clock thread; the engine side
    calls `pull` and `push` from one engine thread. Nothing here blocks.
    """

    def __init__(self, call_rate: int, ring_seconds: float = RING_SECONDS, tx_max_ms: float | None = None,
                 *, tx_settle: int | None = None, rings: tuple[Ring, Ring] | None = None,
                 stamps: tuple[StampLog, StampLog] | None = None, clock: Callable[[], int] = now_ns):
        _check_rate(call_rate)
        if not ring_seconds > 0:
            raise ValueError(f"ring_seconds must be > 0, got {ring_seconds!r}")
        if tx_max_ms is not None and not 0 < tx_max_ms <= ring_seconds * 1000:
            raise ValueError(f"tx_max_ms must be in (0, {ring_seconds * 1000:g}] ms, got {tx_max_ms!r}")
        if tx_settle is not None and (isinstance(tx_settle, bool) or not isinstance(tx_settle, int) or tx_settle < 1):
            raise ValueError(f"tx_settle must be an int >= 1 (pushes) or None, got {tx_settle!r}")
        self.call_rate = call_rate
        self.frame_samples = call_rate // 50  # one 20 ms media frame at the call's rate
        if rings is not None:  # opened elsewhere (attach_engine_side): rx and tx of int16 samples
            self.rx, self.tx = rings
        else:
            self.rx = Ring(capacity_for(int(call_rate * ring_seconds)), "int16")
            self.tx = Ring(capacity_for(int(call_rate * ring_seconds)), "int16")
        if stamps is not None:
            self.rx_stamps, self.tx_stamps = stamps
        else:
            self._stamp_words = np.zeros(2 * _STAMPS_SPAN // 8, np.int64)  # 8-byte aligned
            self.rx_stamps = StampLog.create_in(self._stamp_words[:_STAMPS_SPAN // 8])
            self.tx_stamps = StampLog.create_in(self._stamp_words[_STAMPS_SPAN // 8:])
        self._shm = None  # the shared block the rings live in, when attached to one
        self._views: list = []
        # 24 kHz side of the inbound path: resampled audio waiting to make up whole engine frames
        self._in24 = Ring(capacity_for(int(ENGINE_RATE * ring_seconds)), "int16")
        self._up = Resampler(call_rate, ENGINE_RATE)
        self._down = Resampler(ENGINE_RATE, call_rate)
        # Every underrun (silence played while the engine was late) and every extra frame an engine
        # pushes (silence fed by a watchdog, then the late audio too) would otherwise stay in tx for the
        # rest of the call as added delay. A push that would leave more than this queued drops the
        # oldest samples of what it brings instead. None: no limit.
        self.tx_max = None if tx_max_ms is None else int(call_rate * tx_max_ms / 1000)
        self.tx_trimmed = 0  # call-rate samples dropped by that limit, or to settle (below)
        # A push that finds audio of earlier pushes still queued in tx delays all of its own audio by that
        # much: after an underrun the media side plays the late audio one tick later, and every later push
        # finds the previous one's tail still queued ("the ratchet"), for the rest of the call. When each
        # of the last `tx_settle` pushes found a backlog, AND each of them reached tx at least that
        # backlog + SETTLE_MARGIN_MS before the tick that read it (so the engine would have been in time
        # without the backlog: its steps do not end on both sides of a tick), the smallest backlog is
        # dropped from the start of this push, once: one cut instead of that delay forever. A step time
        # that straddles a tick keeps the backlog: a later phase that holds beats an underrun and a cut
        # every few frames. None: never.
        self.tx_settle = tx_settle
        self.tx_settled = 0  # times that happened
        # per push: [tx position, push ns, backlog found, wait until the media side read it (ns; None until
        # known)]
        self._recent: deque = deque(maxlen=tx_settle or 1)
        self._clock = clock
        self.frames_pulled = 0
        self.frames_pushed = 0
        # sample positions, for the stamps: call-rate samples read from rx and written to tx so far (the
        # media side counts the same streams from the same zero), 24 kHz samples made and handed out, and
        # the last chunks' (rx start, rx end, 24 kHz start, 24 kHz end) to map one onto the other
        self._rx_read = 0
        self._tx_written = 0
        self._made24 = 0
        self._pulled24 = 0
        self._chunks: deque = deque(maxlen=64)
        self.last_arrival_ns = 0  # when the last pulled frame's last sample entered rx (0: unknown)
        self.last_resampled_ns = 0  # when the resampler made the last pulled frame's last sample (0: unknown)
        self.last_push_ns = 0  # when the last push's audio was resampled, just before tx got it
        self.last_push_pos = -1  # tx position of the last push's first sample (-1: nothing went in)

    @staticmethod
    def shared(call_rate: int, ring_seconds: float = RING_SECONDS) -> SharedCallRings:
        """The media side's rx and tx in a new shared_memory block, for an engine in another process."""
        return SharedCallRings(call_rate, ring_seconds)

    @classmethod
    def attach_engine_side(cls, shm_name: str, call_rate: int, ring_seconds: float = RING_SECONDS,
                           tx_max_ms: float | None = None, tx_settle: int | None = None) -> CallAudio:
        """The engine's CallAudio over the rx and tx that `CallAudio.shared` laid out in block `shm_name`.

        `close()` closes this process's mapping and never unlinks (the creating side does). ValueError
        if there is no such block or it does not hold a call's rings.
        """
        _check_rate(call_rate)
        try:
            shm = shared_memory.SharedMemory(name=shm_name)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"no shared call audio named {shm_name!r}: {err}") from None
        views: list = []
        rx = tx = None
        stamps: list = []
        try:
            views.append(shm.buf[:])
            rx = Ring.attach(views[0])
            capacity = rx.capacity
            rx.close()
            views[0].release()
            if shm.size < _block_size(capacity):
                raise ValueError(f"shared block {shm_name!r} is too small for a call's rings and stamp logs")
            views[:] = _block_views(shm.buf, capacity)
            rx, tx = Ring.attach(views[0]), Ring.attach(views[1])
            if rx.dtype != "int16" or tx.dtype != "int16":
                raise ValueError(f"shared block {shm_name!r} holds {rx.dtype}/{tx.dtype} rings, not int16")
            for view in views[2:]:
                stamps.append(StampLog.attach(view))
        except BaseException:
            _release(tuple(u for u in (rx, tx, *stamps) if u is not None), views, shm, unlink=False)
            raise
        audio = cls(call_rate, ring_seconds, tx_max_ms, tx_settle=tx_settle, rings=(rx, tx), stamps=tuple(stamps))
        audio._shm, audio._views = shm, views
        return audio

    # ---- engine side (one engine thread) -------------------------------------------------------------

    def pull(self, n: int) -> np.ndarray | None:
        """The next `n` samples of the caller at 24 kHz (int16), or None until that many have come in."""
        if n <= 0:
            raise ValueError(f"pull() takes a sample count > 0, got {n!r}")
        have = self.rx.readable
        if have:
            chunk = self.rx.read(have)  # all of it: `have` were readable and only we read
            chunk = self._up.process(chunk)
            if len(chunk):
                made = self._in24.write(chunk)
                self._chunks.append((self._rx_read, self._rx_read + have, self._made24, self._made24 + made,
                                     self._clock()))
                self._made24 += made
            self._rx_read += have
        if self._in24.readable < n:
            return None
        self.frames_pulled += 1
        self._pulled24 += n
        self.last_arrival_ns, self.last_resampled_ns = self._arrival_ns(self._pulled24)
        return self._in24.read(n)

    def _arrival_ns(self, end24: int) -> tuple[int, int]:
        """(when the rx samples that completed 24 kHz sample `end24 - 1` entered rx, when the resampler
        made it), 0 where unknown. The call-rate position is interpolated within the chunk that produced
        it (the resampler's own delay, `delay_ms`, is a property of the filter, not of the arrival)."""
        for rx0, rx1, a, b, made_ns in reversed(self._chunks):
            if a < end24 <= b:
                return self.rx_stamps.find(rx0 + math.ceil((end24 - a) * (rx1 - rx0) / (b - a))), made_ns
            if b < end24:
                break
        return 0, 0

    def push(self, frame: np.ndarray) -> int:
        """Queues 24 kHz int16 audio for the caller; returns the call-rate samples accepted into tx."""
        frame = np.asarray(frame)
        if frame.dtype != np.int16 or frame.ndim != 1:
            raise ValueError(f"push() takes a 1-D int16 array of 24 kHz samples, got {frame.dtype} {frame.shape}")
        out = self._down.process(frame)
        self.frames_pushed += 1
        backlog = self.tx.readable  # a snapshot: the media side only lowers it
        if self.tx_settle is not None and len(out):
            drop = min(self._settle_cut(backlog), len(out))
            if drop:
                out = out[drop:]
                self.tx_trimmed += drop
                self.tx_settled += 1
                self._recent.clear()
        if self.tx_max is not None:
            excess = self.tx.readable + len(out) - self.tx_max
            if excess > 0:
                drop = min(excess, len(out))
                out = out[drop:]
                self.tx_trimmed += drop
        # stamped before tx holds it: the media side cannot have read it any earlier
        self.last_push_ns = self._clock()
        written = self.tx.write(out) if len(out) else 0
        self.last_push_pos = self._tx_written if written else -1
        self._tx_written += written
        if written and self.tx_settle is not None:
            self._recent.append([self.last_push_pos, self.last_push_ns, backlog, None])
        return written

    def _settle_cut(self, backlog: int) -> int:
        """Call-rate samples to cut from this push (see `tx_settle`): 0 unless the last `tx_settle`
        pushes all found a backlog and all left tx early enough to have done without it."""
        for entry in self._recent:  # each push's wait is learnt once, on the first push after it left
            if entry[3] is None:
                left_ns = self.departure_ns(entry[0])
                # -1 (its stamp is gone) is asked again too: it blocks a cut until it leaves the window
                if left_ns > 0:
                    entry[3] = left_ns - entry[1]
        if len(self._recent) < self.tx_settle:
            return 0
        lasting = min(backlog, *(e[2] for e in self._recent))
        if lasting <= 0:
            return 0
        waits = [e[3] for e in self._recent]
        if any(w is None for w in waits):
            return 0  # not read yet, or no evidence
        spare_ns = min(waits) - lasting * 1_000_000_000 // self.call_rate
        return lasting if spare_ns >= SETTLE_MARGIN_MS * 1e6 else 0

    def departure_ns(self, pos: int) -> int:
        """When the media side read tx sample `pos` (a `last_push_pos`): 0 while it has not yet (or has,
        and is about to stamp it: it stamps just after reading), -1 if it has but its stamp is gone
        (asked about too late, or the media side keeps no stamps)."""
        ns = self.tx_stamps.find(pos + 1)
        if ns == 0 and self._tx_written - self.tx.readable > pos:
            stamps = self.tx_stamps
            if stamps.appended() and stamps.reached() <= pos:
                return 0  # read, stamp still to come
            ns = stamps.find(pos + 1)  # the stamp may have come between the two looks
            return ns if ns else -1
        return ns

    @property
    def pending_in(self) -> int:
        """24 kHz samples ready for `pull` without waiting, once rx is drained (a snapshot)."""
        up = ENGINE_RATE / self.call_rate
        return self._in24.readable + int(self.rx.readable * up)

    # ---- counters (any thread; snapshots) ------------------------------------------------------------

    @property
    def underruns(self) -> int:
        """Times the media callback found tx short once the engine had started talking (silence played)."""
        return self.tx.underruns

    @property
    def overruns(self) -> int:
        """Writes that found a ring full: the engine fell behind (rx) or ran ahead (tx) by a ring's length."""
        return self.rx.overruns + self.tx.overruns + self._in24.overruns

    @property
    def delay_ms(self) -> float:
        """Delay the two resamplers add to a round trip through the engine, in ms."""
        return float(self._up.delay_ms + self._down.delay_ms)

    def close(self) -> None:
        """Releases the rings' memory; call once neither side will touch them again. Attached to a
        shared block: closes this process's mapping of it (never unlinks)."""
        if not self._in24.closed:
            self._in24.close()
        _release((self.rx, self.tx, self.rx_stamps, self.tx_stamps), self._views, self._shm, unlink=False)
        self._views, self._shm = [], None
