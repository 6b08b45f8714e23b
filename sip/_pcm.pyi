"""PCM between pjsua2's MediaFrame and the call's rings, for the two media callbacks, with no SWIG
call on the way (the layouts it relies on are in ext/pjsua2_frame.h, checked by check_layout)."""
from types import ModuleType
from collections.abc import Callable
from typing import Any, Self

from typing_extensions import disjoint_base

from callbot.engine.audio._ring import Ring
from callbot.engine.audio._stamps import StampLog

ERR_LAYOUT: str
ERR_UNCHECKED: str

def check_layout(pj: ModuleType) -> None:
    """Checks, on real objects of the pjsua2 module `pj`, every layout the pump relies on; ValueError
    naming the first that fails. Must pass once before any frame moves."""

def set_media_thread_hook(hook: Callable[[], object] | None) -> None:
    """`hook()` runs once on each new thread that runs a pump's `requested` (at most 8); None: no hook."""

def vector_to_bytes(byte_vector: Any) -> bytes:
    """A pjsua2 ByteVector's bytes (tests and benches: it allocates)."""

@disjoint_base
class MediaPump:
    """One call's media port: which rings its frames go to, and what went wrong (counters)."""

    def __new__(
        cls,
        rx: Ring,
        tx: Ring,
        frame_samples: int,
        rec_caller: Ring | None = None,
        rec_bot: Ring | None = None,
        rx_stamps: StampLog | None = None,
        tx_stamps: StampLog | None = None,
    ) -> Self: ...
    @property
    def frame_samples(self) -> int: ...
    @property
    def frames_received(self) -> int: ...
    @property
    def frames_requested(self) -> int: ...
    @property
    def tx_underruns(self) -> int:
        """Requested frames not fully covered by tx (silence filled)."""
    @property
    def rx_overruns(self) -> int:
        """Received frames rx could not take whole."""
    @property
    def empty_received(self) -> int:
        """Received frames with no audio (recorded as silence)."""
    @property
    def recorder_overruns(self) -> int:
        """Frames the recorder's rings could not take whole."""
    def received(self, frame: Any) -> None:
        """onFrameReceived: the caller's PCM from pjmedia into rx (and the recorder)."""
    def requested(self, frame: Any) -> None:
        """onFrameRequested: fills the frame from tx; a shortfall is played as silence and counted."""
