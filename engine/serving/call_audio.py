"""One call's audio as the engine sees it: two rings at the call's rate, and 24 kHz frames in and out.

Why: the media callback (pjmedia clock thread) may only copy PCM into and out of rings; everything
slower (resampling to and from the model's 24 kHz, framing) happens on the engine's thread here. The
rx ring is filled by the media callback and drained by `pull`; the tx ring is filled by `push` and
drained by the media callback. Each ring has one producer and one consumer, so no locks anywhere.

    media callback ──> rx (call rate) ──pull──> Resampler(call_rate, 24000) ──> 24 kHz frames ──> engine
    engine ──> 24 kHz frames ──push──> Resampler(24000, call_rate) ──> TxPolicy ──> tx ──> media callback

All samples are int16 (what the phone line carries); an engine that wants float32 converts its frames.
How much may queue in tx, and when a lasting backlog is cut, is the tx policy's (tx_policy.py).

Across two processes, rx and tx live in one shared_memory block (shared_block.py): the SIP side
creates it with `CallAudio.shared` (a `SharedCallRings`: rx and tx only, no resamplers, no engine
thread) and the inference process opens the same block by name with `CallAudio.attach_engine_side`,
which owns the resamplers and the 24 kHz ring.

When audio crossed the media side: beside each ring lies a StampLog (ext/stamps.h; in the shared block
too), to which the media callback appends (samples so far, monotonic ns) once per callback, lock-free.
`pull` maps the frame it returns to when its last sample entered rx (`last_arrival_ns`) and when the
resampler made it (`last_resampled_ns`), `push` notes
where its audio starts in tx (`last_push_pos`), and `departure_ns(pos)` answers, once the media side has
read that far, when that sample left tx: the first and last stages of the runner's FrameStats.

The resamplers' phase: linear by default (the delay is the same at every frequency, `delay_ms` exact,
which the echo line's end-to-end tests rely on); the model line asks for "minimum" (engine/serving/
runner.py, MODEL_RESAMPLER_PHASE), 0.25 / 0.13 ms per direction at 8 / 16 kHz instead of 1.75 / 1.0 ms,
with the same band rejection (BENCHMARKS.md, "Resampler"). `use_resampler_phase` switches a CallAudio
made elsewhere (attached to shared memory) before its first audio passes. `pad_start` puts silence
before the first 24 kHz sample, once: the runner uses it to put a new call's frames in phase with
the others' (engine/serving/round_schedule.py).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable

import numpy as np

from callbot.engine.audio import Resampler, Ring, now_ns
from callbot.engine.audio._stamps import StampLog
from callbot.engine.audio.ring import capacity_for
from callbot.engine.contract import CALL_RATES, ENGINE_RATE
from callbot.engine.serving.shared_block import STAMP_LOG_SPAN, SharedCallRings
from callbot.engine.serving.tx_policy import TxPolicy

RING_SECONDS = 2.0  # capacity of each ring: enough to ride out a stalled engine for this long


def _check_rate(call_rate) -> None:
    if isinstance(call_rate, bool) or not isinstance(call_rate, int) or call_rate not in CALL_RATES:
        raise ValueError(f"call_rate must be one of {CALL_RATES} Hz, got {call_rate!r}")


def _ring_capacity(rate: int, ring_seconds: float) -> int:
    """Samples a ring at `rate` Hz holds to last `ring_seconds` (a power of two)."""
    if not ring_seconds > 0:
        raise ValueError(f"ring_seconds must be > 0, got {ring_seconds!r}")
    return capacity_for(int(rate * ring_seconds))


class CallAudio:
    """Rings and resamplers of one call at `call_rate` Hz (the media port's rate).

    The media side uses `rx` (write) and `tx` (read) from the pjmedia clock thread; the engine side
    calls `pull` and `push` from one engine thread. Nothing here blocks. `tx_max_ms` and `tx_settle`
    are the tx policy's limit and settle window (TxPolicy); None turns either off.
    """

    def __init__(self, call_rate: int, ring_seconds: float = RING_SECONDS, tx_max_ms: float | None = None,
                 *, tx_settle: int | None = None, block: SharedCallRings | None = None,
                 clock: Callable[[], int] = now_ns, resampler_phase: str = "linear"):
        _check_rate(call_rate)
        capacity = _ring_capacity(call_rate, ring_seconds)
        self._tx_policy = TxPolicy(call_rate, tx_max_ms, tx_settle, ring_seconds * 1000)
        self.tx_max = self._tx_policy.max_samples  # call-rate samples tx may hold after a push (None: no limit)
        self.tx_settle = tx_settle  # pushes of evidence before a lasting backlog is cut (None: never)
        self.call_rate = call_rate
        self.frame_samples = call_rate // 50  # one 20 ms media frame at the call's rate
        self._block = block  # the shared block the rings live in, when attached to one
        if block is not None:
            self.rx, self.tx = block.rx, block.tx
            self.rx_stamps, self.tx_stamps = block.rx_stamps, block.tx_stamps
        else:
            self.rx = Ring(capacity, "int16")
            self.tx = Ring(capacity, "int16")
            self._stamp_words = np.zeros(2 * STAMP_LOG_SPAN // 8, np.int64)  # 8-byte aligned
            self.rx_stamps = StampLog.create_in(self._stamp_words[:STAMP_LOG_SPAN // 8])
            self.tx_stamps = StampLog.create_in(self._stamp_words[STAMP_LOG_SPAN // 8:])
        # 24 kHz side of the inbound path: resampled audio waiting to make up whole engine frames
        self._in24 = Ring(_ring_capacity(ENGINE_RATE, ring_seconds), "int16")
        self._up = Resampler(call_rate, ENGINE_RATE, resampler_phase)
        self._down = Resampler(ENGINE_RATE, call_rate, resampler_phase)
        self.resampler_phase = resampler_phase
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
        _check_rate(call_rate)
        return SharedCallRings.create(call_rate, _ring_capacity(call_rate, ring_seconds))

    @classmethod
    def attach_engine_side(cls, shm_name: str, call_rate: int, ring_seconds: float = RING_SECONDS,
                           tx_max_ms: float | None = None, tx_settle: int | None = None) -> CallAudio:
        """The engine's CallAudio over the rx and tx that `CallAudio.shared` laid out in block `shm_name`.

        `close()` closes this process's mapping and never unlinks (the creating side does). ValueError
        if there is no such block or it does not hold a call's rings.
        """
        _check_rate(call_rate)
        block = SharedCallRings.attach(shm_name, call_rate)
        try:
            return cls(call_rate, ring_seconds, tx_max_ms, tx_settle=tx_settle, block=block)
        except BaseException:
            block.close()
            raise

    # ---- engine side (one engine thread) -------------------------------------------------------------

    def use_resampler_phase(self, phase: str) -> None:
        """Resamples with `phase` ("linear" or "minimum") from now on; only before any audio passed
        through the engine side (ValueError after, or for another phase name)."""
        if phase == self.resampler_phase:
            return
        if not self.untouched:
            raise ValueError("the resamplers' phase can only change before the call's first audio")
        self._up = Resampler(self.call_rate, ENGINE_RATE, phase)
        self._down = Resampler(ENGINE_RATE, self.call_rate, phase)
        self.resampler_phase = phase

    def pad_start(self, samples: int) -> None:
        """Puts `samples` (0 <= samples < 2 s) of 24 kHz silence before the caller's first sample;
        only before any audio was pulled (ValueError after)."""
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples < 2 * ENGINE_RATE:
            raise ValueError(f"pad_start takes 0 <= samples < {2 * ENGINE_RATE}, got {samples!r}")
        if not self.untouched:
            raise ValueError("pad_start only goes before the call's first audio")
        if samples:
            self._made24 += self._in24.write(np.zeros(samples, np.int16))

    @property
    def untouched(self) -> bool:
        """No audio has passed the engine side yet (the resamplers' phase and `pad_start` still apply)."""
        return not (self._rx_read or self._made24 or self.frames_pulled or self.frames_pushed)

    def rx_tick(self) -> tuple[int, int]:
        """(call-rate samples the media side has written to rx so far, monotonic ns of the media tick
        that wrote the last of them), from rx's stamp log; (0, 0) before the first stamped write."""
        reached = self.rx_stamps.reached()
        return (reached, self.rx_stamps.find(reached)) if reached else (0, 0)

    def pull(self, n: int) -> np.ndarray | None:
        """The next `n` samples of the caller at 24 kHz (int16), or None until that many have come in."""
        if n <= 0:
            raise ValueError(f"pull() takes a sample count > 0, got {n!r}")
        self._take_rx()
        if self._in24.readable < n:
            return None
        self.frames_pulled += 1
        self._pulled24 += n
        self.last_arrival_ns, self.last_resampled_ns = self._arrival_ns(self._pulled24)
        return self._in24.read(n)

    def frame_due(self, n: int) -> int | None:
        """None until the next `n` samples at 24 kHz are in; else when the last of them entered rx
        (monotonic ns; 0 if unknown). Resamples what came, pulls nothing: `pull(n)` takes that frame."""
        self._take_rx()
        if self._in24.readable < n:
            return None
        return self._arrival_ns(self._pulled24 + n)[0]

    def _take_rx(self) -> None:
        """Everything in rx, resampled into the 24 kHz ring (with its position and time, for the stamps)."""
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

    def push(self, frame: np.ndarray, exact: np.ndarray | None = None, skip: int = 0) -> int:
        """Queues 24 kHz int16 audio for the caller; returns the call-rate samples accepted into tx.

        `exact`: call-rate int16 samples sent instead of what the frame resamples to (a clip the app
        plays, sample for sample), never trimmed by the tx limit (TxPolicy.admit's `whole`). The frame
        still goes through the resampler, so that its history stays continuous for the frames after
        the clip. `skip`: call-rate samples dropped from the
        start of what goes to tx (counted in `tx_trimmed`): the part whose media ticks have passed."""
        frame = np.asarray(frame)
        if frame.dtype != np.int16 or frame.ndim != 1:
            raise ValueError(f"push() takes a 1-D int16 array of 24 kHz samples, got {frame.dtype} {frame.shape}")
        out = self._down.process(frame)
        if exact is not None:
            exact = np.asarray(exact)
            if exact.dtype != np.int16 or exact.ndim != 1:
                raise ValueError(f"exact takes a 1-D int16 array of call-rate samples, got {exact.dtype} {exact.shape}")
            out = exact
        self.frames_pushed += 1
        if skip > 0:
            self._tx_policy.trimmed += min(skip, len(out))
            out = out[skip:]
        out, backlog = self._tx_policy.admit(out, self.tx, self.departure_ns, whole=exact is not None)
        # stamped before tx holds it: the media side cannot have read it any earlier
        self.last_push_ns = self._clock()
        written = self.tx.write(out) if len(out) else 0
        self.last_push_pos = self._tx_written if written else -1
        self._tx_written += written
        if written:
            self._tx_policy.note_push(self.last_push_pos, self.last_push_ns, backlog)
        return written

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
    def tx_trimmed(self) -> int:
        """Call-rate samples the tx policy dropped: by its limit, or to settle."""
        return self._tx_policy.trimmed

    @property
    def tx_settled(self) -> int:
        """Times the tx policy cut a lasting backlog."""
        return self._tx_policy.settled

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
        if self._block is not None:
            self._block.close()  # its rings and stamp logs, then this process's mapping
            return
        for user in (self.rx, self.tx, self.rx_stamps, self.tx_stamps):
            if not user.closed:
                user.close()
