"""One call's rx and tx rings and their stamp logs in one shared_memory block: its layout and lifetime.

Why a module of its own: when the engine runs in another process (BENCHMARKS.md "Media callback":
inference leaves the SIP process), both processes must agree on where each part of the block lies,
and exactly one of them may unlink it. The SIP side creates the block (`SharedCallRings.create`) and
alone unlinks it, after both sides are done or the other side is gone; the inference process opens it
by name (`SharedCallRings.attach`) and only ever unmaps it.

Layout, each part on its own 128-byte line (the ring's indices need 8-byte alignment; separate lines
keep the two sides' writes from sharing one):

    | rx ring | tx ring | rx stamp log | tx stamp log |
"""

from __future__ import annotations

import traceback
from multiprocessing import shared_memory

from callbot.engine.audio import Ring
from callbot.engine.audio._stamps import NBYTES as _STAMP_BYTES
from callbot.engine.audio._stamps import StampLog

_LINE = 128  # bytes: every part starts on its own cache line

# bytes one stamp log takes in the block, whole lines (CallAudio's private logs use the same span)
STAMP_LOG_SPAN = -(-_STAMP_BYTES // _LINE) * _LINE


def _ring_span(capacity: int) -> int:
    """Bytes an int16 ring of `capacity` samples takes in the block, whole lines."""
    return -(-Ring.nbytes(capacity, "int16") // _LINE) * _LINE


def _block_size(capacity: int) -> int:
    return 2 * _ring_span(capacity) + 2 * STAMP_LOG_SPAN


def _block_views(buf: memoryview, capacity: int) -> list[memoryview]:
    """A block's parts, in order: rx, tx, then the rx and tx stamp logs."""
    ring = _ring_span(capacity)
    st = 2 * ring
    return [buf[:ring], buf[ring:st], buf[st:st + STAMP_LOG_SPAN], buf[st + STAMP_LOG_SPAN:]]


def release(users: tuple, views: list, shm: shared_memory.SharedMemory | None, unlink: bool) -> None:
    """Closes `users` (rings and stamp logs: each holds its view until closed), then `views`, then
    `shm`'s mapping, and unlinks the block if `unlink`. Parts already closed are skipped."""
    for user in users:
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


class SharedCallRings:
    """A call's rx and tx (int16 rings at `call_rate` Hz) in one shared_memory block, with the media
    side's stamp logs (`rx_stamps`, `tx_stamps`) after them.

    The media side (SIP process) makes one with `create` (through `CallAudio.shared`) and passes
    `shm_name` to the engine's process, which opens it with `attach` (through
    `CallAudio.attach_engine_side`). `close()` closes this process's mapping; on the creating side it
    also unlinks the block: call it there once the media port is off the bridge. The other side may
    still have it open then: its mapping stays valid until it closes it or exits.
    """

    def __init__(self, call_rate: int, shm: shared_memory.SharedMemory, views: list[memoryview],
                 parts: list, owner: bool):
        """Use `create` or `attach`."""
        self.call_rate = call_rate
        self.frame_samples = call_rate // 50  # one 20 ms media frame at the call's rate
        self.shm_name = shm.name
        self._shm = shm
        self._views = views
        self._owner = owner
        # the media side writes the stamp logs (MediaPump, or `note` from a test's media thread)
        self.rx, self.tx, self.rx_stamps, self.tx_stamps = parts

    @classmethod
    def create(cls, call_rate: int, capacity: int) -> SharedCallRings:
        """A new block holding rings of `capacity` samples (a power of two); this side unlinks it."""
        shm = shared_memory.SharedMemory(create=True, size=_block_size(capacity))
        views = _block_views(shm.buf, capacity)
        parts = [Ring.create_in(views[0], capacity, "int16"), Ring.create_in(views[1], capacity, "int16"),
                 StampLog.create_in(views[2]), StampLog.create_in(views[3])]
        return cls(call_rate, shm, views, parts, owner=True)

    @classmethod
    def attach(cls, shm_name: str, call_rate: int) -> SharedCallRings:
        """The block `create` laid out under `shm_name`; this side never unlinks it. ValueError if there
        is no such block or it does not hold a call's rings."""
        try:
            shm = shared_memory.SharedMemory(name=shm_name)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"no shared call audio named {shm_name!r}: {err}") from None
        views: list = []
        parts: list = []
        try:
            views.append(shm.buf[:])
            probe = Ring.attach(views[0])  # rx's header says the capacity, hence the layout
            capacity = probe.capacity
            probe.close()
            views[0].release()
            if shm.size < _block_size(capacity):
                raise ValueError(f"shared block {shm_name!r} is too small for a call's rings and stamp logs")
            views[:] = _block_views(shm.buf, capacity)
            parts.append(Ring.attach(views[0]))
            parts.append(Ring.attach(views[1]))
            rx, tx = parts
            if rx.dtype != "int16" or tx.dtype != "int16":
                raise ValueError(f"shared block {shm_name!r} holds {rx.dtype}/{tx.dtype} rings, not int16")
            parts.extend(StampLog.attach(view) for view in views[2:])
        except BaseException as err:
            # a failed Ring.attach's frame, kept by the traceback, still holds a view of the block: the
            # mapping could not be closed (BufferError instead of this error, and a leaked mapping)
            traceback.clear_frames(err.__traceback__)
            release(tuple(parts), views, shm, unlink=False)
            raise
        return cls(call_rate, shm, views, parts, owner=False)

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
        """Closes the rings, the stamp logs and this mapping, and unlinks the block on the side that
        created it; safe to call more than once."""
        release((self.rx, self.tx, self.rx_stamps, self.tx_stamps), self._views, self._shm, unlink=self._owner)
        self._views, self._shm = [], None
