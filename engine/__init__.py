"""callbot.engine: everything between PCM in and PCM out, in three rooms.

- `callbot.engine.audio`: rings, resampler, clock, stamps, real-time threads (numpy and our compiled
  core only: the SIP process imports these and nothing else of the engine);
- `callbot.engine.model`: PersonaPlex/Moshi in MLX: blocks, assembled networks, loading, sessions;
- `callbot.engine.contract`: what crosses between app, SIP side and engine (typed messages, protocols);
- `callbot.engine.serving`: the inference runner and process, the echo line, call audio.

The engine knows nothing of SIP or of the app. Importing this package loads no MLX: the model's names
below are resolved on first use (PEP 562), so `from callbot.engine import Ring` stays cheap in the SIP
process while `from callbot.engine import Model` keeps working for the library use.
"""
from __future__ import annotations

import importlib

from callbot.engine.audio import (PeriodicClock, RealtimeResult, Resampler, Ring, make_realtime, now_ns,
                                  sleep_until)

# name -> the module that defines it; imported when the name is first asked for
_LAZY = {
    **dict.fromkeys(("Mimi", "MimiConfig", "MimiWeightsError", "load_mimi"), "callbot.engine.model.mimi"),
    **dict.fromkeys(("LmConfig", "moshiko_7b", "personaplex_7b"), "callbot.engine.model.lm_config"),
    **dict.fromkeys(("LM", "LmSnapshot", "LmState"), "callbot.engine.model.lm"),
    "SamplingConfig": "callbot.engine.model.sampling",
    **dict.fromkeys(("WeightsError", "find_weights", "load_lm"), "callbot.engine.model.weights"),
    "VOICES": "callbot.engine.model.voices",
    **dict.fromkeys(("Model", "Session", "PromptSnapshot"), "callbot.engine.model.session"),
}

__all__ = ["PeriodicClock", "RealtimeResult", "Resampler", "Ring", "make_realtime", "now_ns", "sleep_until",
           *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'callbot.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
