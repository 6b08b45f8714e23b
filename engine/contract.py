"""The contract between the app, the SIP side and whatever talks on a call (the echo line, the model).

Why typed messages: the same words cross a thread (the in-process runner), a process boundary (the
inference process's pipe) and later a network (an inference service for several SIP workers). msgspec
Structs give one schema for all three, encode to msgpack without copies of the PCM, and refuse what
does not fit (`msgspec.ValidationError` names the field). Nothing here imports MLX or pjsua2, so
every process and every later subsystem (flows, analytics, web) may import it.

Five families:
- `CallStart`: what an engine needs to open a call (its id, the media port's rate, the bot, the call's
  variables);
- control operations (`Control`): what the app asks of a running call: `Play`, `StopPlay`, `Inform`,
  `SetPersona`, `MuteCaller`, `HoldBot` (hang-up and transfer are SIP operations: the app's live call sends them
  to the endpoint, not to the engine);
- engine events (`EngineEvent`): what a running call tells the app as it happens: the bot's text
  pieces with their frame times, bot and caller speech start/stop, a clip played, a persona changed,
  per-frame stage stamps, and the call's summary when it closes;
- a bot prepared again while calls run (`PrepareBot` -> `BotPrepared`): a bot's voice, persona or
  sampling changed in the config reaches its next calls without a restart (app/bot_reload.py);
- app events (`AppEvent`): what the app's own parts report about a call, for every later subsystem
  (analytics, the panel) to read off the event bus: the caller recognizer's words (`CallerWords`) and
  each step of a call flow (`FlowTransition`).

Engines implement `CallEngine`; its sessions implement `CallSession`. `open_session`, `control` and
`close_session` are called from the app's threads (never from a media callback) and return quickly;
`on_event` is called from the engine's own threads and must not block (the app's event bus only
enqueues).
"""

from __future__ import annotations

import sys

from typing import Annotated, Callable, Literal, Protocol, Union, runtime_checkable

import msgspec

ENGINE_RATE = 24000  # Hz: the model's only rate
CALL_RATES = (8000, 16000, 24000)  # Hz a call's media port may run at (the resamplers' designs)

Rate = Literal[8000, 16000, 24000]
# a clip of PCM: int16 little-endian mono samples at `rate` (what a WAV holds, what a TTS engine gives)
Pcm16 = Annotated[bytes, msgspec.Meta(max_length=2 * 24000 * 600)]  # at most 10 min at 24 kHz


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every message: immutable, keyword-only, unknown fields refused."""


class CallStart(Message):
    """What an engine needs to serve a call."""

    call_id: str  # the SIP Call-ID (events carry it back)
    rate: Rate  # Hz of the call's media port: the audio the engine's rings carry
    bot: str | None = None  # the bot's name (None: the engine's default)
    variables: dict[str, str] = {}  # the call's variables ({name}, {account}): for flows and personas


# ---- control operations (app -> engine) -----------------------------------------------------------


class Play(Message, tag="play"):
    """Play a clip to the caller. With the model, its audio is also Mimi-encoded and forced into the
    agent's stream (text = PAD), so the model's context holds the clip as its own words. Clips queue;
    `PlayFinished` reports each one."""

    pcm: Pcm16
    rate: int  # Hz of `pcm` (resampled to the call's rate and to 24 kHz where it differs)
    id: str = ""  # echoed in PlayFinished

    def __post_init__(self) -> None:
        _check_clip(self.pcm, self.rate)


class Inform(Message, tag="inform"):
    """Mix audio into what the model hears, never into what the caller hears: a fact from a backend
    spoken to the model (more reliable than forcing text tokens, which garbles PersonaPlex's speech).
    `InformFinished` reports it."""

    pcm: Pcm16
    rate: int
    id: str = ""

    def __post_init__(self) -> None:
        _check_clip(self.pcm, self.rate)


class SetPersona(Message, tag="set_persona"):
    """A new system prompt, taken at the next utterance boundary: the caller's audio is held back, the
    agent finishes its words, the persona's tokens run, 0.5 s of silence, then the call resumes.
    `PersonaChanged` reports it with how long the caller waited."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    id: str = ""


class MuteCaller(Message, tag="mute_caller"):
    """While on, the model hears silence instead of the caller (a card number being read out); the
    recording still holds the caller."""

    on: bool


class StopPlay(Message, tag="stop_play"):
    """Cut the clip playing and the clips queued (`id` = "": all of them; else that one): a caller's key
    press barging into a menu prompt. Each clip cut reports PlayFinished with `interrupted` and how much
    was played."""

    id: str = ""


class HoldBot(Message, tag="hold_bot"):
    """While on, the bot says nothing of its own: its agent stream is forced to silence (PAD text), so the
    model's context holds a quiet agent, and the caller hears only the clips played. A call flow holds it
    in menu and prompt states, where an improvising model would talk over the menu."""

    on: bool


Control = Union[Play, Inform, SetPersona, MuteCaller, StopPlay, HoldBot]


# ---- a bot prepared again while calls run (app -> engine -> app) ------------------------------------


class BotSampling(Message):
    """How a bot's calls sample (PersonaPlex's defaults; temperature 0 = greedy, top_k 0 = the whole
    vocabulary) and their seed (None: each call its own)."""

    text_temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.7
    text_top_k: Annotated[int, msgspec.Meta(ge=0)] = 25
    audio_temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.8
    audio_top_k: Annotated[int, msgspec.Meta(ge=0)] = 250
    seed: int | None = None


class PrepareBot(Message, tag="prepare_bot"):
    """Prepare bot `name`'s prompt again from `voice` and `persona` (what the engine does for every bot
    before the first call) and answer calls of that bot from it once it is ready; `sampling` takes
    effect with it (a change of sampling alone prepares nothing). Calls in progress keep the prompt
    they started from; calls that start before it is ready get the old one. The engine answers with
    one `BotPrepared`. `context`: the frames a call attends to (None: the model's)."""

    name: str
    voice: str  # a voice name ("NATF2") or an absolute path to a .pt / .wav voice
    persona: str
    sampling: BotSampling = BotSampling()
    context: int | None = None


class BotPrepared(Message, tag="bot_prepared"):
    """The answer to a PrepareBot: `ok` (the next calls of `name` start from the new prompt) or not
    (`error`, one line: the bot goes on as it was); `seconds` the preparation took, wall clock, while
    the running calls kept stepping."""

    name: str
    ok: bool
    error: str = ""
    seconds: float = 0.0


# ---- engine events (engine -> app) ----------------------------------------------------------------


class EngineEvent(Message):
    """Something a running call did; `t_ms`: ms since the call's first frame (the engine's clock)."""

    call_id: str
    t_ms: float


class BotText(EngineEvent, tag="bot_text"):
    """A piece of text the model spoke in the frame at `t_ms` (80 ms frames)."""

    piece: str


class BotSpeech(EngineEvent, tag="bot_speech"):
    """The bot started (`speaking`) or stopped talking, by the energy of its audio."""

    speaking: bool


class CallerSpeech(EngineEvent, tag="caller_speech"):
    """The caller started or stopped talking, by the energy of the caller leg."""

    speaking: bool


class PlayFinished(EngineEvent, tag="play_finished"):
    id: str
    ms: float  # how much of the clip was played
    interrupted: bool = False  # cut short: by StopPlay, or the call closed first


class InformFinished(EngineEvent, tag="inform_finished"):
    id: str
    ms: float
    interrupted: bool = False


class PersonaChanged(EngineEvent, tag="persona_changed"):
    id: str
    waited_ms: float  # from the request to the caller's audio being heard again
    replaced: bool = False  # a later set_persona took this one's place before its tokens ran


class FrameStages(EngineEvent, tag="frame_stages"):
    """Per-frame stage stamps (monotonic ns, STAGES order of engine/serving/frame_stats.py; 0: unknown)
    of the frames completed since the last such event (about once a second)."""

    first_frame: int
    rows: list[list[int]]


class TextPiece(Message):
    t_ms: float
    piece: str


class CallSummary(Message):
    """What an engine reports about a call as it closes: counters, per-stage p50/p99/max, the text
    spoken with its times. It joins the call's record."""

    steps: int = 0
    steps_late: int = 0
    silence_fed: int = 0
    frames_dropped: int = 0
    tx_trimmed_ms: float = 0.0
    tx_settled: int = 0
    underruns: int = 0
    overruns: int = 0
    stages_ms: dict[str, dict[str, float]] = {}
    step_s: list[float] = []
    text: list[TextPiece] = []


class SessionClosed(EngineEvent, tag="session_closed"):
    summary: CallSummary


LiveEvent = Union[BotText, BotSpeech, CallerSpeech, PlayFinished, InformFinished, PersonaChanged, FrameStages,
                  SessionClosed]

EventSink = Callable[[LiveEvent], None]


# ---- app events (the app's own parts -> the event bus) ------------------------------------------------


class AppEvent(Message):
    """Something the app's own parts saw on a call; `t_ms`: ms since that part began on the call (the
    recognizer: the caller stream's first sample; a flow: its start)."""

    call_id: str
    t_ms: float


class CallerWords(AppEvent, tag="caller_words"):
    """What the caller said, from the live recognizer on the caller's leg: a partial hypothesis (may
    still change) or a final one (an utterance ended). Times: ms since the caller stream's first sample."""

    text: str
    final: bool
    start_ms: float
    end_ms: float


class FlowTransition(AppEvent, tag="flow_transition"):
    """A call flow moved: from `from_state` ("" at the start) to `to_state` ("" when the flow ended),
    because of `reason` (start, next, digits, no_input, no_match, reprompt, caller_said, bot_said,
    silence, max_s, webhook, webhook_failed, branch, transfer_failed, hangup, transfer, call_ended, error).
    `detail`: what triggered it (the digits, masked when sensitive; the words matched; the failure)."""

    flow: str
    from_state: str
    to_state: str
    reason: str
    detail: str = ""


# ---- the protocols ----------------------------------------------------------------------------------


class ControlNotSupported(ValueError):
    """The engine cannot do this operation (e.g. a persona on the echo line)."""


@runtime_checkable
class CallSession(Protocol):
    """One call as an engine serves it: `audio` is what the media port binds to (rx/tx rings at the
    call's rate and the media side's stamp logs)."""

    start: CallStart

    @property
    def audio(self): ...

    def control(self, op: Control) -> None:
        """Queue a control operation; it takes effect on the engine's next frame. Raises
        ControlNotSupported for an operation this engine cannot do, RuntimeError once closed."""
        ...


@runtime_checkable
class CallEngine(Protocol):
    """Something that talks on calls: opens a session per call and closes it when the call ends."""

    on_event: EventSink | None

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine's thread or process, if anything did (the app then ends its calls)."""
        ...

    def open_session(self, start: CallStart) -> CallSession:
        """A new session for the call; raises RuntimeError when the engine has no room or has stopped."""
        ...

    def close_session(self, session: CallSession) -> CallSummary | None:
        """Stops serving the session, releases what it holds and returns its summary (None if the engine
        has none); safe to call more than once."""
        ...

    def close(self) -> None:
        """Stops the engine; its open sessions end."""
        ...


@runtime_checkable
class BotPreparer(Protocol):
    """An engine that can prepare a bot again while it runs (the model, in each of its hostings);
    `prepares_bots` may be False where this one cannot (a model service that answers the echo line)."""

    @property
    def prepares_bots(self) -> bool: ...

    def prepare_bot(self, request: PrepareBot, done: Callable[[BotPrepared], None] | None = None) -> None:
        """Queue `request`; `done` gets its BotPrepared on one of the engine's threads (it must only
        record or enqueue). Returns at once."""
        ...


def answer_prepared(done: Callable[[BotPrepared], None] | None, result: BotPrepared,
                    say: Callable[[str], None] | None = None) -> None:
    """Gives a PrepareBot's answer to whoever asked (`done`; None: nobody did). Their failure is said in
    one line (`say`, default stderr), never raised into the engine's thread that answers."""
    if done is None:
        return
    try:
        done(result)
    except Exception as err:
        line = f"bot {result.name}: the answer to its preparation was not taken: {err!r}"
        if say is not None:
            say(line)
        else:
            print(f"callbot: {line}", file=sys.stderr, flush=True)


def _check_clip(pcm: bytes, rate: int) -> None:
    if rate not in CALL_RATES and rate not in (11025, 22050, 32000, 44100, 48000):
        raise ValueError(f"rate must be a common audio rate in Hz, got {rate!r}")
    if len(pcm) % 2:
        raise ValueError("pcm must hold whole int16 samples (an even number of bytes)")
