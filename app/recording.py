"""Call recordings: a stereo WAV (caller left, bot right) written as the call goes, plus a JSON sidecar.

Why this shape: a recording must survive the process dying mid-call (kill -9, a crash, power cut of the
process alone), so nothing waits for the end of the call. The media callback only copies each 20 ms
frame into two lock-free rings (sip/media_port.py); one recorder thread per process drains every call's
rings into its WAV file. Every `sync_interval_s` (1 s) it hands the data to the OS and then rewrites
the RIFF and data sizes in the header, in that order, so the header never claims more than the file
holds: a killed process leaves a standard WAV, playable by anything (stdlib `wave`, sox), holding all
audio up to the last sync. `read_recording` also takes the few unsynced frames after it.

The sidecar (`<name>.json`) is written when the call starts (its end still null) and replaced, atomically,
when it ends; it carries the CallRecord (id, from, to, start, end, codec, DTMF, transfer, hangup cause)
and what the WAV holds. The recorder is also a subscriber of the app's event bus (`on_event`): the
call's live events (the bot's words with their times, who speaks when, DTMF, clips played, persona
changes) go, one JSON line each as they happen, into `<name>.events.jsonl`, so a call cut short by a
crash still has its words up to the moment it died.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import threading
import time
from typing import Any

import msgspec
import numpy as np

from callbot.app.event_bus import BusEvent, call_id_of
from callbot.app.event_log import event_line
from callbot.engine.audio.ring import Ring, capacity_for
from callbot.engine.contract import FrameStages

CHANNELS = ("caller", "bot")  # left, right
RING_SECONDS = 8  # per channel: the recorder thread may stall this long before audio is dropped
SYNC_INTERVAL_S = 1.0
POLL_MS = 100.0
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

    `write` appends interleaved int16 frames; `sync` pushes them to the OS and then updates the two
    size fields (RIFF at byte 4, data at byte 40) to cover exactly what is there.
    """

    def __init__(self, path: str | os.PathLike, rate: int, channels: int):
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 384000:
            raise ValueError(f"rate must be an int in Hz (1..384000), got {rate!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels!r}")
        self.path = os.fspath(path)
        self.rate = rate
        self.channels = channels
        self._f = open(self.path, "wb")
        self._f.write(_wav_header(rate, channels, 0))
        self._f.flush()
        self._written = 0  # data bytes handed to write()
        self._synced = 0  # data bytes the header covers

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
        self._f.write(data)
        self._written += len(data)

    def sync(self) -> None:
        if self._synced == self._written:
            return
        # data first, then the sizes that describe it: a kill between the two leaves a shorter, valid file
        self._f.flush()
        fd = self._f.fileno()
        os.pwrite(fd, struct.pack("<I", 36 + self._written), 4)
        os.pwrite(fd, struct.pack("<I", self._written), 40)
        self._synced = self._written

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(content), indent=2))
        f.write(b"\n")
    os.replace(tmp, path)  # readers see the old sidecar or the new one, never half of one


class CallRecording:
    """One call's recording: the two rings the media port fills, and the files they end up in.

    `caller` and `bot` hold int16 samples at `rate` Hz; the media port writes one frame to each per
    clock tick (producer), the recorder thread reads them (consumer).
    """

    def __init__(self, directory: str, record: Any, rate: int, sync_interval_s: float):
        meta = _record_dict(record)
        call_id = str(meta.get("call_id") or "call")
        start = float(meta.get("start") or time.time())
        self.call_id = call_id
        self.name = recording_name(call_id, start)
        self.wav_path = os.path.join(directory, self.name + ".wav")
        self.sidecar_path = os.path.join(directory, self.name + ".json")
        self.events_path = os.path.join(directory, self.name + ".events.jsonl")
        self._events = None  # the events file, opened by the first event
        self.rate = rate
        capacity = capacity_for(rate * RING_SECONDS)
        self.caller = Ring(capacity, "int16")
        self.bot = Ring(capacity, "int16")
        self.sync_interval_s = sync_interval_s
        self._wav = WavStreamWriter(self.wav_path, rate, 2)
        self._last_sync = time.monotonic()
        self._write_sidecar(meta, complete=False)

    @property
    def frames_synced(self) -> int:
        return self._wav.frames_synced

    @property
    def frames_written(self) -> int:
        return self._wav.frames_written

    @property
    def dropped(self) -> int:
        """Times a ring was full and audio was lost (the recorder thread fell behind)."""
        return self.caller.overruns + self.bot.overruns

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
            self._wav.write(frames)
        now = time.monotonic()
        if final or now - self._last_sync >= self.sync_interval_s:
            self._wav.sync()
            self._last_sync = now

    def _write_sidecar(self, meta: dict, complete: bool) -> None:
        meta = dict(meta)
        meta["recording"] = {
            "wav": os.path.basename(self.wav_path),
            "rate": self.rate,
            "channels": list(CHANNELS),
            "frames": self._wav.frames_synced,
            "seconds": round(self._wav.frames_synced / self.rate, 3),
            "complete": complete,
            "dropped": self.dropped,
        }
        meta["events"] = os.path.basename(self.events_path)
        _write_json_atomically(self.sidecar_path, meta)

    def _note(self, line: bytes) -> None:
        if self._events is None:
            self._events = open(self.events_path, "ab")
        self._events.write(line + b"\n")
        self._events.flush()  # to the OS at once: a crash of this process loses none of it

    def _finish(self, record: Any) -> None:
        self._drain(final=True)
        self._wav.close()
        if self._events is not None:
            self._events.close()
        self._write_sidecar(_record_dict(record), complete=True)
        self.caller.close()
        self.bot.close()


class Recorder:
    """Writes every call's recording from one thread; `start` when media begins, `finish` at hangup.

    Detach the media port before `finish`: finish drains the rings, and the port must no longer
    write to them.
    """

    def __init__(self, directory: str | os.PathLike, sync_interval_s: float = SYNC_INTERVAL_S, poll_ms: float = POLL_MS):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise ValueError(f"recording directory {self.directory!r} does not exist")
        if not 0 < sync_interval_s <= 60:
            raise ValueError(f"sync_interval_s must be in (0, 60] seconds, got {sync_interval_s!r}")
        if not 1 <= poll_ms <= 1000:
            raise ValueError(f"poll_ms must be 1..1000 ms, got {poll_ms!r}")
        self.sync_interval_s = sync_interval_s
        self.poll_s = poll_ms / 1000
        # guards the list and each recording's file; never taken by a media callback
        self._lock = threading.Lock()
        self._active: list[CallRecording] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def start(self, record: Any, rate: int) -> CallRecording:
        """Opens the call's WAV and writes its sidecar; returns the rings for the media port."""
        if self._stop.is_set():
            raise RuntimeError("the recorder is closed")
        if self.error is not None:
            raise RuntimeError(f"the recorder's thread failed ({self.error!r}): no new recording can start")
        rec = CallRecording(self.directory, record, rate, self.sync_interval_s)
        with self._lock:
            self._active.append(rec)
        return rec

    def finish(self, rec: CallRecording, record: Any) -> None:
        """Writes the rest of the call's audio, closes its WAV and finalizes its sidecar from `record`."""
        with self._lock:
            if rec not in self._active:
                return
            self._active.remove(rec)
            rec._finish(record)

    @property
    def active(self) -> int:
        return len(self._active)

    def on_event(self, event: BusEvent) -> None:
        """An event bus subscriber: a live event of a call being recorded goes into its events file (the
        bus's handler thread; per-frame stage stamps stay out: they are the metrics')."""
        call_id = call_id_of(event)
        if call_id is None or isinstance(event, FrameStages):
            return
        line = event_line(event)
        with self._lock:
            for rec in self._active:
                if rec.call_id == call_id:
                    rec._note(line)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                with self._lock:
                    for rec in self._active:
                        rec._drain(final=False)
        except BaseException as exc:  # a disk error must be visible, not a silent stop of all recordings
            self.error = exc
            raise

    def close(self) -> None:
        """Stops the thread and finishes what is still open (with the sidecar as written at start)."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:  # held while finishing: a thread that outlived the join cannot drain the same ring
            active, self._active = self._active, []
            for rec in active:
                meta = _read_json(rec.sidecar_path)
                meta.pop("recording", None)
                rec._finish(meta)


def _read_json(path: str) -> dict:
    with open(path, "rb") as f:
        return msgspec.json.decode(f.read())
