"""Call recordings: a stereo WAV (caller left, bot right) written as the call goes, plus a JSON sidecar.

Why this shape: a recording must survive the process dying mid-call (kill -9, a crash, power cut of the
process alone), so nothing waits for the end of the call. The media callback only copies each 20 ms
frame into two lock-free rings (sip/media_port.py); one recorder thread per process drains every call's
rings into its WAV file. It hands the data to the OS and then rewrites the RIFF and data sizes in the
header, in that order, so the header never claims more than the file holds: first as soon as there is
audio (FIRST_SYNC_S, within 200 ms of the start at the 100 ms poll), then every `sync_interval_s` (1 s).
A killed process leaves a standard WAV, playable by anything (stdlib `wave`, sox), holding all audio up
to the last sync. `read_recording` also takes the few unsynced frames after it.

The sidecar (`<name>.json`) carries the CallRecord (id, from, to, start, answer, end, codec, DTMF,
transfer, hangup cause) and what the WAV holds. It is written when the call's audio starts and kept
current while the call goes on, from the same live record the SIP side fills: once the WAV first covers
audio, at most a second after each change the record reports (answer, media, a digit, a transfer:
CallRecord.changed), and every `sidecar_interval_s` (10 s) in any case, each time replaced atomically
(a new file renamed over the old). So a SIGKILL mid-call leaves the call's facts and how many seconds
were safe on disk at most 10 s before it; `complete` says false. When the call ends it is written a
last time with `complete` true. The recorder is also a subscriber of the app's event bus (`on_event`):
the call's live events (the bot's words with their times, who speaks when, DTMF, clips played, persona
changes) go, one JSON line each as they happen, into `<name>.events.jsonl`, so a call cut short by a
crash still has its words up to the moment it died.

What a peer controls is bounded: a record keeps the first 1,000 digits (`dtmf_dropped` counts the rest,
sip/call_record.py) and an events file stops at `events_max_bytes` (16 MiB: hours of a talking bot;
`events_dropped` counts the lines left out). Text that is not UTF-8 is escaped, never refused
(app/event_log.py's json_bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import struct
import threading
import time
from typing import Any, Callable, Protocol

import msgspec
import numpy as np

from callbot.app.atomic_file import replace_file
from callbot.app.event_bus import BusEvent, call_id_of
from callbot.app.event_log import event_line, json_bytes
from callbot.engine.audio.ring import Ring, capacity_for
from callbot.engine.contract import FrameStages

log = logging.getLogger(__name__)
CHANNELS = ("caller", "bot")  # left, right
RING_SECONDS = 8  # per channel: the recorder thread may stall this long before audio is dropped
SYNC_INTERVAL_S = 1.0
FIRST_SYNC_S = 0.1  # the first header update, after the recording starts (then each poll until audio is in)
SIDECAR_INTERVAL_S = 10.0  # the sidecar is rewritten at least this often while the call goes on
SIDECAR_MIN_GAP_S = 1.0  # and at most this often for changes (a digit flood costs one write a second)
EVENTS_MAX_BYTES = 16 * 1024 * 1024  # per call's events file; a talking bot writes ~75 kB a minute
POLL_MS = 100.0
TRANSCRIPT_WAIT_S = 5.0  # a call's sidecar waits this long at most for the recognizer's last words
TRANSCRIPT_GRACE_S = 0.3  # after them: time for the bus to carry them into the events file
RETRY_S = 1.0  # after the disk refused a write, a call's files are tried again this often
HOLD_S = 8.0  # a call's audio held in memory while the disk refuses (256 kB at 8 kHz, 512 kB at 16 kHz)
COMPLAIN_S = 60.0  # a disk that keeps refusing is said again this often (one line for every call)
_HEADER_BYTES = 44
_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")


def _wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    block = 2 * channels
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data_bytes, b"WAVE",
        b"fmt ", 16, 1, channels, rate, rate * block, block, 16,
        b"data", data_bytes,
    )  # fmt-format: PCM (1), 16 bits per sample


class WavStreamWriter:
    """A 16-bit PCM WAV file that grows while it is written and is a valid WAV at every sync.

    `write` appends interleaved int16 frames straight to the OS (no buffer of ours: a write the disk
    refuses, full or failing, raises OSError with the file cut back to what it held before, so no part
    of a chunk is left and a later write continues it cleanly); `sync` then updates the two size fields
    (RIFF at byte 4, data at byte 40) to cover exactly what is there.
    """

    def __init__(self, path: str | os.PathLike, rate: int, channels: int):
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 384000:
            raise ValueError(f"rate must be an int in Hz (1..384000), got {rate!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels!r}")
        self.path = os.fspath(path)
        self.rate = rate
        self.channels = channels
        self._f = open(self.path, "wb", buffering=0)
        self._written = 0  # data bytes in the file after the header
        self._synced = 0  # data bytes the header covers
        try:
            self._append(_wav_header(rate, channels, 0), at=0)
        except BaseException:
            self._f.close()
            try:
                os.unlink(self.path)  # a file without its header would be no WAV at all
            except OSError:
                pass
            raise

    @property
    def frames_written(self) -> int:
        return self._written // (2 * self.channels)

    @property
    def frames_synced(self) -> int:
        """Frames the on-disk header covers: what survives if the process dies now."""
        return self._synced // (2 * self.channels)

    def write(self, frames: np.ndarray) -> None:
        a = np.asarray(frames)
        if a.dtype != np.int16 or a.size % self.channels or (a.ndim == 2 and a.shape[1] != self.channels):
            raise ValueError(f"write() takes int16 frames of {self.channels} channel(s), got {a.dtype} {a.shape}")
        data = np.ascontiguousarray(a).astype("<i2", copy=False).tobytes()
        self._append(data, at=_HEADER_BYTES + self._written)
        self._written += len(data)

    def _append(self, data: bytes, at: int) -> None:
        """`data` at byte `at` (the file's end), whole; on OSError the file is cut back to `at`."""
        fd, view, done = self._f.fileno(), memoryview(data), 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], at + done)  # the OS may take part of it
        except OSError:
            try:
                os.ftruncate(fd, at)  # shrinking needs no space; the next write starts at `at` in any case
            except OSError:
                pass
            raise

    def sync(self) -> None:
        if self._synced == self._written:
            return
        # data first (already with the OS), then the sizes that describe it: a kill between the two
        # leaves a shorter, valid file
        fd = self._f.fileno()
        os.pwrite(fd, struct.pack("<I", 36 + self._written), 4)
        os.pwrite(fd, struct.pack("<I", self._written), 40)
        self._synced = self._written

    def close(self) -> None:
        """Syncs and closes; the file is closed even when the sync fails (the OSError is raised after)."""
        if not self._f.closed:
            try:
                self.sync()
            finally:
                self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


def read_recording(path: str | os.PathLike) -> tuple[int, np.ndarray]:
    """(rate, int16 samples [frames, channels]) of a recording, even one cut short by a crash.

    A header that covers less than the file holds (the process died between a write and the next sync)
    is not trusted: every whole frame in the file is returned. ValueError if it is not such a WAV.
    """
    label = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        body = f.read()
    if len(head) < _HEADER_BYTES:
        raise ValueError(f"{label}: {len(head)} bytes, shorter than a WAV header ({_HEADER_BYTES})")
    riff, _, wave_, fmt, fmt_len, tag, channels, rate, _, block, bits, data, _ = struct.unpack(
        "<4sI4s4sIHHIIHH4sI", head
    )
    if (riff, wave_, fmt, data) != (b"RIFF", b"WAVE", b"fmt ", b"data") or fmt_len != 16:
        raise ValueError(f"{label}: not a recording written by WavStreamWriter (plain RIFF/WAVE, fmt, data)")
    if tag != 1 or bits != 16 or channels not in (1, 2) or block != 2 * channels:
        raise ValueError(f"{label}: expected 16-bit PCM, 1 or 2 channels; got format {tag}, {bits} bits, {channels} ch")
    whole = len(body) // block * block
    samples = np.frombuffer(body[:whole], "<i2").astype(np.int16).reshape(-1, channels)
    return rate, samples


def recording_name(call_id: str, start: float) -> str:
    """File stem for a call: UTC start time first (sorts by time), then the Call-ID made file-safe."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))
    return f"{stamp}-{_SAFE.sub('_', call_id)[:80] or 'call'}"


def _record_dict(record: Any) -> dict:
    if hasattr(record, "to_dict"):
        return dict(record.to_dict())
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    if isinstance(record, dict):
        return dict(record)
    raise ValueError(f"a call record must be a dataclass, a dict or have to_dict(), got {type(record).__name__}")


def _write_json_atomically(path: str, content: dict) -> None:
    data = msgspec.json.format(json_bytes(content), indent=2) + b"\n"  # encoded before any file is touched
    replace_file(path, data)  # readers see the old sidecar or the new one, never half of one


class DiskTrouble:
    """What the recordings' disk refused (full, failing, read-only), for the metrics and the log: a line
    when it starts refusing (at most one a minute), and one when it takes every call's writes again.

    Why not a line per failure: a full disk refuses every call's every write, ten times a second (and a
    nearly full one takes a write now and then, which must not make two lines of each). Why the
    calls go on: a full disk is the operator's to fix, and a call dropped for it loses the caller too;
    what the disk did not take is counted (`lost_s`, per call in its sidecar) and the audio's time kept
    (silence stands in for it in the WAV once the disk takes writes again)."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.clock = clock
        self.errors = 0  # writes refused
        self.lost_s = 0.0  # seconds of call audio the disk did not take
        self.failing: set[str] = set()  # calls whose files the disk refuses now
        self._said_at: float | None = None  # when a refusal was last said
        self._recovery_unsaid = False
        self._lock = threading.Lock()

    def refused(self, call_id: str, what: str, err: OSError) -> None:
        with self._lock:
            self.errors += 1
            self.failing.add(call_id)
            now = self.clock()
            if self._said_at is None or now - self._said_at >= COMPLAIN_S:
                self._said_at, self._recovery_unsaid = now, True
                log.warning("recordings: the disk under %s refused %s of call %s (%s); calls go on, %.1f s of "
                            "their audio lost so far", self.directory, what, call_id, _why(err), self.lost_s)

    def lost(self, seconds: float) -> None:
        with self._lock:
            self.lost_s += seconds

    def wrote(self, call_id: str) -> None:
        """A call's files are written again (or given up on: its call is over)."""
        with self._lock:
            if call_id not in self.failing:
                return
            self.failing.discard(call_id)
            if not self.failing and self._recovery_unsaid:
                self._recovery_unsaid = False
                log.warning("recordings: the disk under %s takes writes again (%.1f s of call audio were lost "
                            "in all)", self.directory, self.lost_s)


def _why(err: OSError) -> str:
    return err.strerror or repr(err)


class CallRecording:
    """One call's recording: the two rings the media port fills, and the files they end up in.

    `caller` and `bot` hold int16 samples at `rate` Hz; the media port writes one frame to each per
    clock tick (producer), the recorder thread reads them (consumer). `record` is the call's live record
    (a CallRecord the SIP side keeps filling, or a dict): the sidecar is rewritten from it during the call.

    A disk that refuses writes (full, failing) costs as little as it can: the audio drained meanwhile is
    held in memory (`hold_s`, 8 s) and written once the disk takes writes again (tried every `retry_s`,
    1 s); what did not fit is counted in `lost_frames` and becomes silence in the WAV, so the recording
    keeps the call's time. A refused sidecar is written at the next try, a refused events line counted in
    `events_dropped`. The rings are drained all the while (the caller recognizer still hears the caller).
    """

    def __init__(self, directory: str, record: Any, rate: int, sync_interval_s: float,
                 sidecar_interval_s: float = SIDECAR_INTERVAL_S, events_max_bytes: int = EVENTS_MAX_BYTES,
                 trouble: DiskTrouble | None = None, retry_s: float = RETRY_S, hold_s: float = HOLD_S):
        meta = _record_dict(record)
        call_id = str(meta.get("call_id") or "call")
        start = float(meta.get("start") or time.time())
        self.call_id = call_id
        self.name = recording_name(call_id, start)
        self.wav_path = os.path.join(directory, self.name + ".wav")
        self.sidecar_path = os.path.join(directory, self.name + ".json")
        self.events_path = os.path.join(directory, self.name + ".events.jsonl")
        self.trouble = trouble if trouble is not None else DiskTrouble(directory)
        self._events = None  # the events file, opened by the first event
        self._events_bytes = 0
        self.events_max_bytes = events_max_bytes
        self.events_dropped = 0  # lines not written: past events_max_bytes, or refused by the disk
        self.record = record
        self.rate = rate
        capacity = capacity_for(rate * RING_SECONDS)
        self.caller = Ring(capacity, "int16")
        self.bot = Ring(capacity, "int16")
        self.sync_interval_s = sync_interval_s
        self.lost_frames = 0  # frames the disk did not take
        self.write_error: str | None = None  # what the disk said, while it refuses this call's files
        self._gap = 0  # lost frames the WAV has yet to get as silence
        self._held: list[np.ndarray] = []  # audio drained while the disk refused, oldest first
        self._held_frames = 0
        self.held_frames_max = int(rate * hold_s)
        self._retry_at = 0.0  # monotonic s: the disk is tried again from then
        self.retry_s = retry_s
        self._wav: WavStreamWriter | None = None
        now = time.monotonic()
        self._next_sync = now + min(FIRST_SYNC_S, sync_interval_s)
        self.sidecar_interval_s = sidecar_interval_s
        self._sidecar_revision = getattr(record, "revision", 0)
        self._sidecar_frames = 0  # frames the last sidecar said were synced
        self._sidecar_at = now
        self._sidecar_failed = False
        self._dropped_at_close: int | None = None  # `dropped` once the rings are released
        self._write_out(force=True)
        self._write_sidecar(meta, complete=False)

    listener: CallerListener | None = None  # set by the Recorder: who hears the caller leg as it is drained
    taps: tuple = ()  # Recorder.tap: who gets both legs as they are drained (a supervisor listening in)
    final_record: Any = None  # the record to finish the files from, once the transcript is done
    finish_by = 0.0  # monotonic s: when the files are finished even without the transcript's end

    @property
    def frames_synced(self) -> int:
        return self._wav.frames_synced if self._wav is not None else 0

    @property
    def frames_written(self) -> int:
        return self._wav.frames_written if self._wav is not None else 0

    @property
    def dropped(self) -> int:
        """Times a ring was full and audio was lost (the recorder thread fell behind)."""
        if self._dropped_at_close is not None:
            return self._dropped_at_close
        return self.caller.overruns + self.bot.overruns

    @property
    def held_frames(self) -> int:
        """Frames of audio held in memory for a disk that refused them."""
        return self._held_frames

    @property
    def retry_due(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _refused(self, what: str, err: OSError) -> None:
        self.write_error = _why(err)
        self._retry_at = time.monotonic() + self.retry_s
        self.trouble.refused(self.call_id, what, err)

    def _wrote(self) -> None:
        if self.write_error is not None:
            self.write_error = None
            self.trouble.wrote(self.call_id)

    def _lose(self, frames: int) -> None:
        self.lost_frames += frames
        self._gap += frames
        self.trouble.lost(frames / self.rate)

    def _write_out(self, force: bool = False) -> bool:
        """The WAV open, the audio the disk did not take written as silence, then the audio held for it;
        False while the disk refuses (tried again once retry_s has passed, or now with `force`)."""
        if self._wav is not None and not self._gap and not self._held:
            return True
        if not force and self.write_error is not None and not self.retry_due:
            return False
        try:
            if self._wav is None:
                self._wav = WavStreamWriter(self.wav_path, self.rate, 2)
            while self._gap:
                n = min(self._gap, self.rate)  # a second at a time: what the disk took stays taken
                self._wav.write(np.zeros((n, 2), np.int16))
                self._gap -= n
            while self._held:
                self._wav.write(self._held[0])
                self._held_frames -= len(self._held.pop(0))
        except OSError as err:
            self._refused("its recording", err)
            return False
        self._wrote()
        return True

    def _drain(self, final: bool) -> None:
        """Moves what both rings hold, in step, into the WAV (recorder thread, or finish())."""
        n = min(self.caller.readable, self.bot.readable)
        if final:
            n = max(self.caller.readable, self.bot.readable)
        if n:
            frames = np.zeros((n, 2), np.int16)
            for ch, ring in enumerate((self.caller, self.bot)):
                k = min(n, ring.readable)
                if k:
                    frames[:k, ch] = ring.read(k)
            if getattr(self.record, "redact_dtmf", False):
                # a secret is being gathered (a call flow's sensitive gather): neither the file nor the
                # recognizer keeps the caller, who may read it out or send it as in-band tones
                frames[:, 0] = 0
            self._keep(frames, final)
            if self.listener is not None:
                self.listener.heard(self.call_id, np.ascontiguousarray(frames[:, 0]))
            for tap in self.taps:
                try:
                    tap(frames)
                except Exception as err:  # noqa: BLE001 - a listener's failure costs its audio, not the recording
                    log.warning("call %s: a tap of its audio failed (%r)", self.call_id, err)
        elif self._held or self._gap or self._wav is None:  # nothing new, audio still waiting for the disk
            self._keep(np.zeros((0, 2), np.int16), final)
        now = time.monotonic()
        if self._wav is not None and (final or now >= self._next_sync):
            try:
                self._wav.sync()
            except OSError as err:
                self._refused("its recording's header", err)
            # until the header covers some audio, look again at the next poll
            self._next_sync = now + self.sync_interval_s if self._wav.frames_synced else now

    def _keep(self, frames: np.ndarray, final: bool) -> None:
        """`frames` into the WAV, or held while the disk refuses: a hiccup shorter than `hold_s` loses
        nothing; past it the oldest held audio is lost (silence stands in for it), and all of it when the
        call is over on a disk that still refuses."""
        self._held.append(frames)
        self._held_frames += len(frames)
        over = self._held_frames > self.held_frames_max
        if self._write_out(force=final or over):  # about to lose audio: the disk is asked once more first
            return
        excess = self._held_frames if final else self._held_frames - self.held_frames_max
        while excess > 0:  # the oldest audio goes first, to the frame
            oldest = self._held[0]
            n = min(len(oldest), excess)
            if n == len(oldest):
                self._held.pop(0)
            else:
                self._held[0] = oldest[n:]
            self._held_frames -= n
            self._lose(n)
            excess -= n

    def _refresh_sidecar(self) -> None:
        """Rewrites the sidecar from the live record when it is due (recorder thread): the first time the
        WAV covers audio, a change the record reported (at most every SIDECAR_MIN_GAP_S), every
        sidecar_interval_s, and after one the disk refused, at its next try."""
        now = time.monotonic()
        revision = getattr(self.record, "revision", 0)
        since = now - self._sidecar_at
        due = (since >= self.sidecar_interval_s
               or (revision != self._sidecar_revision and since >= SIDECAR_MIN_GAP_S)
               or (self.frames_synced and not self._sidecar_frames)
               or (self._sidecar_failed and self.retry_due))
        if not due:
            return
        try:
            meta = _record_dict(self.record)
        except RuntimeError:  # the SIP side changed a dict while it was copied: the next poll tries again
            return
        self._write_sidecar(meta, complete=False)
        self._sidecar_revision = revision
        self._sidecar_at = now

    def _write_sidecar(self, meta: dict, complete: bool) -> bool:
        """False when the disk refused it (the previous sidecar, if any, stays as it was)."""
        meta = dict(meta)
        meta["recording"] = {
            "wav": os.path.basename(self.wav_path),
            "rate": self.rate,
            "channels": list(CHANNELS),
            "frames": self.frames_synced,
            "seconds": round(self.frames_synced / self.rate, 3),
            "complete": complete,
            "dropped": self.dropped,
            "lost_s": round(self.lost_frames / self.rate, 3),  # audio the disk did not take
            "write_error": self.write_error,
            "updated": round(time.time(), 3),  # when this sidecar was written: how current it is
        }
        meta["events"] = os.path.basename(self.events_path)
        meta["events_dropped"] = self.events_dropped
        try:
            _write_json_atomically(self.sidecar_path, meta)
        except OSError as err:
            self._sidecar_failed = True
            self._refused("its record", err)
            return False
        self._sidecar_failed = False
        self._sidecar_frames = self.frames_synced
        return True

    def _note(self, line: bytes) -> None:
        size = len(line) + 1
        if self._events_bytes + size > self.events_max_bytes:
            self.events_dropped += 1
            return
        data, done = memoryview(line + b"\n"), 0
        try:
            if self._events is None:
                self._events = open(self.events_path, "ab", buffering=0)
            while done < len(data):
                done += self._events.write(data[done:])  # the OS may take part of it
        except OSError as err:
            if self._events is not None and done:
                try:
                    os.ftruncate(self._events.fileno(), self._events_bytes)  # no half line left behind
                except OSError:
                    pass
            self.events_dropped += 1
            self._refused("its events", err)
            return
        self._events_bytes += size

    def _finish(self, record: Any) -> bool:
        self._finish_audio()
        return self._finish_files(record)

    def _finish_audio(self) -> None:
        """The WAV complete and closed: the call's audio is done (the media port no longer writes)."""
        self._drain(final=True)
        if self._wav is not None:
            try:
                self._wav.close()
            except OSError as err:
                self._refused("its recording's header", err)

    def _finish_files(self, record: Any) -> bool:
        """The events file closed, the rings released, the sidecar written a last time (`complete`).
        False when the disk refused that sidecar: `write_final` tries it again."""
        if self._events is not None:
            self._events.close()
        self._dropped_at_close = self.dropped
        self.caller.close()
        self.bot.close()
        self.final_record = record
        return self.write_final()

    def write_final(self) -> bool:
        """The final sidecar (from `final_record`); True once it is on disk."""
        done = self._write_sidecar(_record_dict(self.final_record), complete=True)
        if done:
            self._wrote()
        return done


class CallerListener(Protocol):
    """Gets each call's caller leg as the recorder drains it (about every 100 ms, int16 at the call's
    rate): the caller recognizer. Called on the recorder's thread: must not block."""

    def opened(self, record: Any, rate: int) -> None: ...

    def heard(self, call_id: str, samples: np.ndarray) -> None: ...

    def closed(self, call_id: str) -> None: ...


class Recorder:
    """Writes every call's recording from one thread; `start` when media begins, `finish` at hangup.

    Detach the media port before `finish`: finish drains the rings, and the port must no longer
    write to them.

    Each call's files go into `directory`, or into the folder `directory_for(record)` names (created
    when missing; None = `directory`): a tenant's own folder (app/routes.py), chosen by whoever knows
    tenants, so that this stays a recorder of calls.
    """

    def __init__(self, directory: str | os.PathLike, sync_interval_s: float = SYNC_INTERVAL_S, poll_ms: float = POLL_MS,
                 sidecar_interval_s: float = SIDECAR_INTERVAL_S, events_max_bytes: int = EVENTS_MAX_BYTES,
                 directory_for: Callable[[Any], str | None] | None = None, listener: CallerListener | None = None,
                 retry_s: float = RETRY_S, hold_s: float = HOLD_S):
        self.directory = os.fspath(directory)
        self.directory_for = directory_for
        self.listener = listener  # the caller recognizer (app/caller_speech.py), fed off the media clock
        # told of each call whose files are final (WAV closed, events file closed, sidecar complete): the
        # analysis (app/analysis_host.py). Called on the recorder's thread or the one that finished the
        # call, under the recorder's lock: must only hand the call on, never block
        self.on_final: list[Callable[[CallRecording], None]] = []
        if not os.path.isdir(self.directory):
            raise ValueError(f"recording directory {self.directory!r} does not exist")
        if not 0 < sync_interval_s <= 60:
            raise ValueError(f"sync_interval_s must be in (0, 60] seconds, got {sync_interval_s!r}")
        if not 1 <= poll_ms <= 1000:
            raise ValueError(f"poll_ms must be 1..1000 ms, got {poll_ms!r}")
        if not 0 < sidecar_interval_s <= 600:
            raise ValueError(f"sidecar_interval_s must be in (0, 600] seconds, got {sidecar_interval_s!r}")
        if isinstance(events_max_bytes, bool) or not isinstance(events_max_bytes, int) or events_max_bytes < 0:
            raise ValueError(f"events_max_bytes must be an int >= 0 (bytes), got {events_max_bytes!r}")
        if not 0 < retry_s <= 60:
            raise ValueError(f"retry_s must be in (0, 60] seconds, got {retry_s!r}")
        if not 0 <= hold_s <= 60:
            raise ValueError(f"hold_s must be in [0, 60] seconds, got {hold_s!r}")
        self.hold_s = hold_s
        self.sync_interval_s = sync_interval_s
        self.retry_s = retry_s
        self.sidecar_interval_s = sidecar_interval_s
        self.events_max_bytes = events_max_bytes
        self.poll_s = poll_ms / 1000
        # guards the list and each recording's file; never taken by a media callback
        self._lock = threading.Lock()
        self._active: list[CallRecording] = []
        self._closing: list[CallRecording] = []  # audio finished, files waiting for the caller's last words
        self._unwritten: list[CallRecording] = []  # finished calls whose final sidecar the disk refused
        self.trouble = DiskTrouble(self.directory)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def start(self, record: Any, rate: int) -> CallRecording | None:
        """Opens the call's WAV and writes its sidecar; returns the rings for the media port, or None (one
        log line) when the call's own folder cannot be made: that call goes on unrecorded. A disk that
        refuses the files (full) does not stop it: they are written once the disk takes them."""
        if self._stop.is_set():
            raise RuntimeError("the recorder is closed")
        if self.error is not None:
            raise RuntimeError(f"the recorder's thread failed ({self.error!r}): no new recording can start")
        directory = self.directory
        if self.directory_for is not None:
            try:
                directory = self.directory_for(record) or self.directory
                os.makedirs(directory, exist_ok=True)
            except Exception as err:  # the call goes on; only its recording is lost
                why = err.strerror if isinstance(err, OSError) and err.strerror else repr(err)
                log.warning("call %s is not recorded: its folder %r cannot be made (%s)",
                            _record_dict(record).get("call_id"), directory, why)
                return None
        rec = CallRecording(directory, record, rate, self.sync_interval_s, self.sidecar_interval_s,
                            self.events_max_bytes, self.trouble, self.retry_s, self.hold_s)
        if self.listener is not None:
            try:
                self.listener.opened(record, rate)
                rec.listener = self.listener
            except Exception as err:  # the call is recorded all the same, only not transcribed
                log.warning("call %s: the caller recognizer did not take it (%s)", rec.call_id, err)
        with self._lock:
            self._active.append(rec)
        return rec

    def tap(self, call_id: str, fn: Callable[[np.ndarray], None]) -> tuple[int, Callable[[], None]] | None:
        """`fn(frames)` with each piece of the call's audio as it is drained (about every 100 ms: int16
        [n, 2], caller and bot, the caller silent while a secret is gathered, as in the file), on the
        recorder's thread: it must not block. Returns (the call's sample rate, a function that removes
        the tap), or None when the call is not being recorded."""
        with self._lock:
            rec = next((r for r in self._active if r.call_id == call_id), None)
            if rec is None:
                return None
            rec.taps = (*rec.taps, fn)

        def untap() -> None:
            with self._lock:
                rec.taps = tuple(t for t in rec.taps if t is not fn)

        return rec.rate, untap

    def finish(self, rec: CallRecording, record: Any) -> None:
        """Writes the rest of the call's audio, closes its WAV and finalizes its sidecar from `record`.

        With a listener (the caller recognizer), the sidecar and the events file wait for the caller's
        last words (`transcript_done`, at most TRANSCRIPT_WAIT_S): the WAV is complete at once."""
        with self._lock:
            if rec not in self._active:
                return
            self._active.remove(rec)
            if rec.listener is None:
                self._finished(rec, rec._finish(record))
                return
            rec._finish_audio()
            rec.final_record = record
            rec.finish_by = time.monotonic() + TRANSCRIPT_WAIT_S
            self._closing.append(rec)
        rec.listener.closed(rec.call_id)

    def transcript_done(self, call_id: str) -> None:
        """The recognizer delivered the call's last words: its files are finished at the next poll, once
        the bus has carried those words into its events file (TRANSCRIPT_GRACE_S)."""
        with self._lock:
            for rec in self._closing:
                if rec.call_id == call_id:
                    rec.finish_by = min(rec.finish_by, time.monotonic() + TRANSCRIPT_GRACE_S)

    def _finish_closing(self, now: float | None) -> None:
        """Finishes the files of calls whose transcript is done or overdue (all of them with now=None)."""
        due = [rec for rec in self._closing if now is None or now >= rec.finish_by]
        for rec in due:
            self._closing.remove(rec)
            self._finished(rec, rec._finish_files(rec.final_record))

    def _finished(self, rec: CallRecording, written: bool) -> None:
        """A call's files are final (its watchers told), or wait for the disk (tried again each RETRY_S)."""
        if written:
            self._final(rec)
        else:
            self._unwritten.append(rec)

    def _write_unwritten(self, force: bool) -> None:
        for rec in list(self._unwritten):
            if (force or rec.retry_due) and rec.write_final():
                self._unwritten.remove(rec)
                self._final(rec)

    def _final(self, rec: CallRecording) -> None:
        for watcher in self.on_final:
            try:
                watcher(rec)
            except Exception as err:  # noqa: BLE001 - a watcher's bug costs its own work, not the recording
                log.warning("call %s: told its files are final, %r failed: %s", rec.call_id, watcher, err)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def held_s(self) -> float:
        """Seconds of call audio held in memory, all calls together, for a disk that refuses it."""
        return sum(rec.held_frames / rec.rate for rec in list(self._active))

    @property
    def unwritten(self) -> int:
        """Finished calls whose final sidecar waits for the disk to take it."""
        return len(self._unwritten)

    def on_event(self, event: BusEvent) -> None:
        """An event bus subscriber: a live event of a call being recorded goes into its events file (the
        bus's handler thread; per-frame stage stamps stay out: they are the metrics')."""
        call_id = call_id_of(event)
        if call_id is None or isinstance(event, FrameStages):
            return
        line = event_line(event)
        with self._lock:
            for rec in (*self._active, *self._closing):
                if rec.call_id == call_id:
                    rec._note(line)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                with self._lock:
                    for rec in self._active:
                        rec._drain(final=False)
                        rec._refresh_sidecar()
                    if self._closing:
                        self._finish_closing(time.monotonic())
                    if self._unwritten:
                        self._write_unwritten(force=False)
        except BaseException as exc:  # a bug must be visible, not a silent stop of all recordings (a disk
            self.error = exc  # that refuses writes is each call's own: DiskTrouble)
            raise

    def close(self) -> None:
        """Stops the thread and finishes what is still open (from each call's record as it stands)."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:  # held while finishing: a thread that outlived the join cannot drain the same ring
            active, self._active = self._active, []
            for rec in active:
                self._finished(rec, rec._finish(rec.record))
            self._finish_closing(None)
            self._write_unwritten(force=True)  # a last try
            for rec in self._unwritten:
                log.error("call %s: its final record could not be written to %s (%s); its WAV holds %.1f s, "
                          "%.1f s of its audio were lost", rec.call_id, rec.sidecar_path, rec.write_error,
                          rec.frames_synced / rec.rate, rec.lost_frames / rec.rate)
                self.trouble.wrote(rec.call_id)  # given up on: no longer counted as failing
            self._unwritten = []
        for rec in active:  # outside the lock: a listener may call transcript_done, which takes it
            if rec.listener is not None:
                rec.listener.closed(rec.call_id)
