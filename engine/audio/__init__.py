"""callbot.engine.audio: the audio path's parts that both processes share (numpy and our compiled core,
never MLX): lock-free rings in shared memory, the stamp logs beside them, the low-latency resampler, the
absolute-deadline clock and real-time thread setup. The SIP side imports these and nothing else of
the engine (checked by the import contracts in pyproject.toml)."""
from callbot.engine.audio._clock import PeriodicClock, now_ns, sleep_until
from callbot.engine.audio.realtime import RealtimeResult, make_realtime
from callbot.engine.audio.resampler import Resampler, to_float32, to_int16
from callbot.engine.audio.ring import Ring, capacity_for

__all__ = ["PeriodicClock", "RealtimeResult", "Resampler", "Ring", "capacity_for", "make_realtime", "now_ns",
           "sleep_until", "to_float32", "to_int16"]
