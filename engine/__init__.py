"""callbot.engine: everything between PCM in and PCM out — rings, resampling, clocks, the model.

The engine knows nothing of SIP: it is fed 24 kHz PCM and gives PCM back, so any Python program can
embed it. The compiled core (ext/) is exposed here under its public names.
"""
from callbot.engine._clock import PeriodicClock, now_ns, sleep_until
from callbot.engine.ring import Ring
from callbot.engine.resampler import Resampler
from callbot.engine.realtime import RealtimeResult, make_realtime
from callbot.engine.mimi import Mimi, MimiConfig, MimiWeightsError, load_mimi
from callbot.engine.lm_config import LmConfig, moshiko_7b, personaplex_7b
from callbot.engine.lm import LM, LmSnapshot, LmState
from callbot.engine.sampling import SamplingConfig
from callbot.engine.weights import WeightsError, find_weights, load_lm
from callbot.engine.voices import VOICES
from callbot.engine.session import Model, Session, PromptSnapshot
