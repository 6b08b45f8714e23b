"""Runs the call flows of `callbot serve`: one FlowRunner per call whose bot has a flow, all on one thread.

Why one thread and a worker pool: a runner (flows/runner.py) never waits, so one thread steers every
call, fed by the event bus (digits, the caller's and the bot's words, who speaks, clips done, transfer
answers, hang-ups) and ticking each runner's timers every TICK_S. What takes time - text to speech, a
webhook, a SIP operation that goes through the endpoint's thread - runs on a small pool and comes back
as an input to the runner, so a slow backend delays its own call's next state and nothing else.

It acts on calls only through their LiveCall (app/calls.py): play, inform, set_persona, mute_caller,
transfer, hangup. An attended transfer with an announcement is steered here too: the text is spoken
(TTS) before the target is dialled, played on the consultation leg once that leg is answered (the
router opened it held: the bot never talks to the target), and its PlayFinished sends the REFER with
Replaces; the endpoint sends it anyway ANNOUNCE_SLACK_S after the clip's length, should the clip
never play (no audio on the leg). Secrets typed into a sensitive gather are redacted at the source: the call's record
is told (CallRecord.redact_dtmf), so the SIP side files those digits masked and flags their events,
and the caller recognizer is not fed while the caller may read the secret out.
"""
from __future__ import annotations

import concurrent.futures
import logging
import pathlib
import queue
import threading
import time
from typing import Callable, Protocol

import numpy as np

from callbot.app.calls import CallControlError, LiveCall
from callbot.app.errors import StartupError
from callbot.engine.audio.wavfile import read_wav
from callbot.app.event_bus import EventBus
from callbot.app.flow_reload import FlowFiles
from callbot.app.settings import Settings
from callbot.engine.contract import (BotSpeech, BotText, CallerSpeech, CallerWords, FlowTransition, PlayFinished)
from callbot.flows.runner import (CallGone, Digit, FlowRunner, Input, PromptDone, Said, Speech, TransferDone,
                                  WebhookDone)
from callbot.flows.schema import Flow, Webhook, load_flow
from callbot.flows.webhook import WebhookError, call_webhook
from callbot.sip import events as ev

log = logging.getLogger(__name__)

HANGUP_AFTER_PROMPT_S = 0.25  # the tx buffer and the bridge's tick: a goodbye is heard to its end
TICK_S = 0.05  # timer resolution of every flow (gather timeouts, silence, max_s): 50 ms
WORKERS = 8  # text to speech and webhooks in flight at once, across all calls
GONE_AFTER_CLOSE_S = 30.0  # a flow whose call's audio went ends this long after if no CallEnded came
INBOX = 8192
ANNOUNCE_SLACK_S = 3.0  # attended transfer: the REFER goes at most this long after the announcement's length
# silence after an announcement: PlayFinished comes when its last frame is queued for the target, and the
# REFER ends the leg soon after; this covers what is still queued (the engine's tx ring, up to 120 ms with
# the model) and the target's jitter buffer
ANNOUNCE_TAIL_S = 0.25
FLOW_PATH_KEPT = 200  # states a call record lists (a menu a caller loops in is bounded)  # inputs waiting for the flow thread; beyond, an input is dropped and counted


class Speaker(Protocol):
    """Text to speech (callbot.speech.tts.TextToSpeech): mono int16 samples and their rate."""

    def synthesize(self, text: str) -> tuple[np.ndarray, int]: ...


class _HostedCall:
    """A runner's FlowCall on a live call: quick operations at once, slow ones on the pool."""

    def __init__(self, host: FlowHost, live: LiveCall):
        self.host = host
        self.live = live
        self._transfers = 0  # attended transfers cancelled so far: one started before a cancel is dropped

    @property
    def call_id(self) -> str:
        return self.live.call_id

    def _back(self, inp: Input) -> None:
        self.host.post(self.call_id, inp)

    def play(self, clip: str, id: str) -> None:
        try:
            self.live.play(self.host.clips.get(clip, clip), id=id)  # decoded once, when the flows loaded
        except CallControlError as err:
            self._back(PromptDone(id, error=str(err)))

    def stop_prompt(self, id: str) -> None:
        with self.host.speaking_lock:  # a `say` still being synthesized must not play after all
            if id in self.host.speaking:
                self.host.speaking[id] = False
        try:
            self.live.stop_play(id)
        except CallControlError as err:
            log.info("call %s: stop_play: %s", self.call_id, err)

    def say(self, text: str, id: str, cache: bool = True) -> None:
        with self.host.speaking_lock:
            self.host.speaking[id] = True
        self.host.submit(lambda: self._speak(text, id, cache))

    def _speak(self, text: str, id: str, cache: bool) -> None:
        try:
            audio = self.host.synthesize(text, cache)
            with self.host.speaking_lock:  # held across the play: a stop lands before it or cuts it
                if self.host.speaking.pop(id, False):
                    self.live.play(audio, id=id)
        except Exception as err:  # TTS or the call: the prompt is lost, the flow goes on
            with self.host.speaking_lock:
                self.host.speaking.pop(id, None)
            log.warning("call %s: a `say` prompt failed: %s", self.call_id, err)  # not the text: it may be personal
            self._back(PromptDone(id, error=str(err)))

    def inform(self, text: str, id: str, cache: bool = True) -> None:
        def run() -> None:
            try:
                self.live.inform(self.host.synthesize(text, cache), id=id)
            except Exception as err:
                log.warning("call %s: an `inform` failed: %s", self.call_id, err)
        self.host.submit(run)

    def set_persona(self, text: str, id: str) -> None:
        try:
            self.live.set_persona(text, id=id)
        except CallControlError as err:
            log.warning("call %s: set_persona: %s", self.call_id, err)

    def mute_caller(self, on: bool) -> None:
        try:
            self.live.mute_caller(on)
        except CallControlError as err:
            log.warning("call %s: mute_caller: %s", self.call_id, err)

    def hold_bot(self, on: bool) -> None:
        try:
            self.live.hold_bot(on)
        except CallControlError as err:
            log.warning("call %s: hold_bot: %s", self.call_id, err)

    def redact_digits(self, on: bool) -> None:
        self.live.record.redact_dtmf = on
        self.host.set_redacting(self.call_id, on)

    def webhook(self, spec: Webhook, variables: dict[str, str], id: str) -> None:
        def run() -> None:
            try:
                self._back(WebhookDone(id, reply=call_webhook(spec, variables, self.host.http)))
            except WebhookError as err:
                self._back(WebhookDone(id, error=str(err)))
        self.host.submit(run)

    def transfer(self, uri: str) -> None:
        def run() -> None:
            try:
                self.live.transfer(uri)
            except (CallControlError, RuntimeError, ValueError, TimeoutError) as err:
                self._back(TransferDone(ok=False, reason=str(err)))
        self.host.submit(run)

    def transfer_attended(self, uri: str, announce: str | None, timeout_s: float | None) -> None:
        started = self._transfers

        def run() -> None:
            refer_after_s = 0.0
            if announce:
                try:
                    samples, rate = self.host.synthesize(announce)
                    tail = np.zeros(int(rate * ANNOUNCE_TAIL_S), dtype=np.asarray(samples).dtype)
                    audio = (np.concatenate([np.asarray(samples), tail]), rate)
                    self.host.announce_on_answer(self.live, audio)
                    refer_after_s = len(audio[0]) / audio[1] + ANNOUNCE_SLACK_S
                except Exception as err:  # no announcement: the caller is put through all the same
                    log.warning("call %s: announce %r: %s; transferring without it", self.call_id, announce[:60], err)
            try:
                self.live.transfer_attended(uri, answer_timeout_s=timeout_s, refer_after_s=refer_after_s)
            except (CallControlError, RuntimeError, ValueError, TimeoutError) as err:
                self.host.announce_on_answer(self.live, None)
                self._back(TransferDone(ok=False, reason=str(err)))
                return
            if self._transfers != started:  # the flow left the state while the target was being dialled
                self._cancel()
        self.host.submit(run)

    def cancel_transfer(self) -> None:
        self._transfers += 1
        self.host.announce_on_answer(self.live, None)
        self.host.submit(self._cancel)

    def _cancel(self) -> None:
        try:
            self.live.cancel_transfer()
        except (CallControlError, RuntimeError, ValueError, TimeoutError) as err:
            log.info("call %s: cancel_transfer: %s", self.call_id, err)

    def hangup(self) -> None:
        def run() -> None:
            try:
                self.live.hangup()
            except (CallControlError, RuntimeError, ValueError, TimeoutError) as err:
                log.info("call %s: hangup: %s", self.call_id, err)
        # PlayFinished comes when a prompt's last frame is queued, not heard: the BYE waits for it to leave
        timer = threading.Timer(HANGUP_AFTER_PROMPT_S, lambda: self.host.submit(run))
        timer.daemon = True
        timer.start()

    def report(self, event: FlowTransition) -> None:
        record = self.live.record
        flow = record.flow if record.flow is not None else {"name": event.flow, "path": []}
        if event.to_state and event.to_state != event.from_state:
            flow["path"] = [*flow["path"], event.to_state][-FLOW_PATH_KEPT:]
        flow.update(state=event.to_state, reason=event.reason, detail=event.detail)
        record.flow = flow
        record.changed()  # the sidecar shows the flow's course within a second
        self.host.bus.publish(event)


class FlowHost:
    """`flows`: bot name -> (flow name, Flow). `call_opened`/`call_closed` come from the CallRouter."""

    def __init__(self, bus: EventBus, flows: dict[str, tuple[str, Flow]], speaker: Speaker | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        import httpx

        self.bus = bus
        self.flows = flows
        self.files: FlowFiles | None = None  # app/flow_reload.py: the flow files taken again when changed
        self.speaker = speaker
        self.clock = clock
        self.wall = wall  # the time of day, for the flows' business hours
        # trust_env=False: a card number never follows an HTTPS_PROXY or .netrc from the environment
        self.http = httpx.Client(trust_env=False)
        self.dropped = 0
        self.errors = 0
        self.runners: dict[str, FlowRunner] = {}
        self._redacting: set[str] = set()
        # `say` prompts being synthesized -> still wanted (False: stopped before their speech was ready)
        self.speaking: dict[str, bool] = {}
        self.speaking_lock = threading.Lock()
        self.clips: dict[str, tuple[np.ndarray, int]] = {}  # the flows' WAV clips, decoded once
        self._flow_calls: set[str] = set()  # calls with a flow, from call_opened on (their events are wanted)
        self._closed_at: dict[str, float] = {}  # calls whose audio went, by when (their CallEnded is due)
        # attended transfers: announcements to play, by the call being transferred (its LiveCall and the
        # clip), until its consultation leg's audio comes up; then legs opened but not yet answered (early
        # media), and legs whose announcement plays (their PlayFinished sends the REFER), by the leg's Call-ID
        self._announcements: dict[str, tuple[LiveCall, tuple[np.ndarray, int]]] = {}
        self._early_legs: dict[str, LiveCall] = {}
        self._announcing: dict[str, LiveCall] = {}  # leg's Call-ID -> the call being transferred
        self._inbox: queue.Queue = queue.Queue(INBOX)
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="flow-io")
        self._stop = threading.Event()
        self._sub = bus.attach("flows", self._from_bus, accept=_wanted)
        self._thread = threading.Thread(target=self._run, name="flows", daemon=True)
        self._thread.start()

    # ---- from other threads ------------------------------------------------------------------------

    def call_opened(self, live: LiveCall) -> None:
        if live.transfer_of is not None:  # a consultation leg: no flow of its own, maybe an announcement
            if live.transfer_of in self._announcements:
                self._put(("leg", live))
            return
        if live.start.bot in self.flows:
            self._flow_calls.add(live.call_id)
            self._put(("open", live))

    def call_closed(self, live: LiveCall) -> None:
        """The call's audio is gone. Its flow ends on its CallEnded, which comes through the bus after the
        events before it (a transfer's last NOTIFY); this is the fallback if that never comes."""
        if live.call_id in self._flow_calls:
            self._put(("closed", live.call_id, self.clock()))

    def announce_on_answer(self, live: LiveCall, audio: tuple[np.ndarray, int] | None) -> None:
        """Plays `audio` on `live`'s consultation leg once it is answered (None: forget it)."""
        if audio is None:
            self._announcements.pop(live.call_id, None)
        else:
            self._announcements[live.call_id] = (live, audio)

    def post(self, call_id: str, inp: Input) -> None:
        self._put(("input", call_id, inp))

    def submit(self, fn: Callable[[], None]) -> None:
        try:
            self._pool.submit(fn)
        except RuntimeError:  # shutting down
            pass

    def synthesize(self, text: str, cache: bool = True) -> tuple[np.ndarray, int]:
        """Speech for `text`; `cache` False (a text with the call's variables) bypasses the clip cache."""
        if self.speaker is None:
            raise CallControlError("no text-to-speech engine is configured for `say`")
        inner = getattr(self.speaker, "inner", None)
        if not cache and inner is not None:
            return inner.synthesize(text)
        return self.speaker.synthesize(text)

    def set_redacting(self, call_id: str, on: bool) -> None:
        (self._redacting.add if on else self._redacting.discard)(call_id)

    def redacting(self, call_id: str) -> bool:
        """True while the call's caller may be reading out a secret (the recognizer must not hear it)."""
        return call_id in self._redacting

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def _put(self, item: tuple) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _from_bus(self, event) -> None:
        if isinstance(event, ev.CallConfirmed):
            # every call we dial: its leg may not be in _early_legs yet (the flow thread files it)
            if event.direction == "outbound" and (self._announcements or self._early_legs):
                self._put(("answered", event.call_id))
            return
        if isinstance(event, PlayFinished) and event.call_id in self._announcing:
            self._put(("announced", event.call_id))
            return
        if isinstance(event, ev.CallEnded):
            if event.call_id in self._flow_calls:
                self._put(("gone", event.call_id, CallGone(event.cause)))
            return
        inp = _input_of(event)
        if inp is not None and event.call_id in self._flow_calls:
            self.post(event.call_id, inp)

    # ---- the flow thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = self.clock()
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=max(0.0, min(TICK_S, next_tick - self.clock())))
            except queue.Empty:
                item = None
            if item is not None:
                self._guarded(item[1].call_id if item[0] in ("open", "leg") else item[1], lambda: self._take(item))
            now = self.clock()
            if now >= next_tick:
                next_tick = now + TICK_S
                for call_id, runner in list(self.runners.items()):
                    self._guarded(call_id, lambda: runner.tick(now))
            for call_id, at in list(self._closed_at.items()):
                if now - at > GONE_AFTER_CLOSE_S:  # no CallEnded came: end the flow anyway
                    self._guarded(call_id, lambda: self._gone(call_id, CallGone("closed"), now))
            for call_id in [c for c, r in self.runners.items() if r.ended]:
                del self.runners[call_id]

    def _take(self, item: tuple) -> None:
        now = self.clock()
        if item[0] == "open":
            live: LiveCall = item[1]
            bot: str = live.start.bot  # type: ignore[assignment]  (call_opened took only bots with a flow)
            # the file's flow when it changed since (app/flow_reload.py): this call and the next ones follow it
            files = self.files
            name, flow = files.current(bot) if files is not None and bot in files else self.flows[bot]
            variables = {"call_id": live.call_id, **live.start.variables}
            runner = FlowRunner(flow, _HostedCall(self, live), live.call_id, variables, now=now, name=name,
                                wall=self.wall())  # business hours ([hours]) go by the wall clock
            self.runners[live.call_id] = runner
            runner.start()
        elif item[0] == "leg":
            leg: LiveCall = item[1]
            if leg.record.answered is None:  # early media: the target is not listening yet
                self._early_legs[leg.call_id] = leg
            else:
                self._announce(leg)
        elif item[0] == "answered":
            leg = self._early_legs.pop(item[1], None)
            if leg is not None:
                self._announce(leg)
        elif item[0] == "announced":
            transferred = self._announcing.pop(item[1], None)
            if transferred is not None:
                self._complete(transferred)
        elif item[0] == "closed":
            self._closed_at[item[1]] = item[2]
        elif item[0] == "gone":
            self._gone(item[1], item[2], now)
        else:
            runner = self.runners.get(item[1])
            if runner is not None:
                runner.handle(item[2], now)

    def _announce(self, leg: LiveCall) -> None:
        """The consultation leg is answered: its announcement plays to the target (flow thread)."""
        found = self._announcements.pop(leg.transfer_of or "", None)
        if found is None or leg.ended:
            return  # cancelled meanwhile, or the leg is gone already
        transferred, audio = found
        self._announcing[leg.call_id] = transferred
        try:
            leg.play(audio, id=f"{leg.call_id}#announce")
        except CallControlError as err:
            log.warning("call %s: announcement to the transfer target: %s", transferred.call_id, err)
            self._announcing.pop(leg.call_id, None)
            self._complete(transferred)

    def _complete(self, transferred: LiveCall) -> None:
        """The REFER with Replaces of `transferred`'s attended transfer (its announcement was said)."""
        def run() -> None:
            try:
                transferred.complete_transfer()
            except (CallControlError, RuntimeError, ValueError, TimeoutError) as err:  # it failed or went already
                log.info("call %s: complete_transfer: %s", transferred.call_id, err)
        self.submit(run)

    def _gone(self, call_id: str, gone: CallGone, now: float) -> None:
        self._announcements.pop(call_id, None)
        for leg_id in [k for k, leg in self._early_legs.items() if leg.transfer_of == call_id]:
            del self._early_legs[leg_id]
        for leg_id in [k for k, live in self._announcing.items() if live.call_id == call_id]:
            del self._announcing[leg_id]
        self._flow_calls.discard(call_id)
        self._redacting.discard(call_id)
        self._closed_at.pop(call_id, None)
        runner = self.runners.pop(call_id, None)
        if runner is not None:
            runner.handle(gone, now)

    def _guarded(self, call_id: str, fn: Callable[[], None]) -> None:
        """A runner that fails costs its own flow (reported, ended), never the thread or other calls."""
        try:
            fn()
        except Exception as err:
            self.errors += 1
            log.exception("flow of call %s failed", call_id)
            runner = self.runners.pop(call_id, None)
            if runner is not None:
                call = runner.call
                if isinstance(call, _HostedCall):  # no dead air: the bot converses freely, as without a flow
                    for release in (lambda: call.live.hold_bot(False), lambda: call.live.mute_caller(False)):
                        try:
                            release()
                        except CallControlError:
                            pass
                    call.redact_digits(False)
                    call.report(FlowTransition(call_id=call_id, t_ms=0.0, flow=runner.name,
                                               from_state=runner.state or "", to_state="", reason="error",
                                               detail=f"{type(err).__name__}: {err}"[:200]))


def start_flows(settings: Settings, bus: EventBus) -> FlowHost | None:
    """A FlowHost for the bots that name a flow (files checked when the settings were loaded), with the
    configured text to speech when a flow speaks (`say`, `inform`); None when no bot has a flow."""
    flows = {bot.name: (pathlib.Path(bot.flow).stem, load_flow(bot.flow)) for bot in settings.bots if bot.flow}
    if not flows:
        return None
    speaks = any(s.say or s.inform or s.announce for _, flow in flows.values() for s in flow.states.values())
    host = FlowHost(bus, flows, speaker=speaker_for(settings) if speaks else None)
    for _, flow in flows.values():
        for state in flow.states.values():
            for clip in (state.play, state.hold_music):
                if clip and clip not in host.clips:
                    try:
                        host.clips[clip] = load_clip(clip)
                    except (OSError, ValueError) as err:
                        host.close()
                        raise StartupError(f"flow clip {clip!r}: {err}") from None
    host.files = FlowFiles(flows, {bot.name: bot.flow for bot in settings.bots if bot.flow}, load_clip, host.clips,
                           can_speak=lambda: host.speaker is not None)
    return host


def load_clip(path: str) -> tuple[np.ndarray, int]:
    """A flow's WAV clip decoded, mono."""
    data, rate = read_wav(path)
    return data.mean(axis=0) if data.ndim == 2 else data, rate


def speaker_for(settings: Settings) -> Speaker:
    """The configured text to speech (speech/tts.py), checked to work now rather than at a caller's ear."""
    from callbot.speech.tts import TtsError, build_tts

    try:
        return build_tts(settings.tts)
    except TtsError as err:
        raise StartupError(f"text to speech for the flows' `say`: {err}") from None


_WANTED = (ev.CallEnded, ev.CallConfirmed, ev.DtmfReceived, ev.TransferProgress, CallerWords, BotText, BotSpeech, CallerSpeech, PlayFinished)


def _wanted(event) -> bool:
    return isinstance(event, _WANTED)


def _input_of(event) -> Input | None:
    """A bus event as a runner's input (None: nothing a flow reacts to)."""
    if isinstance(event, ev.DtmfReceived):
        return Digit(event.digit)
    if isinstance(event, CallerWords):
        return Said("caller", event.text, event.final)
    if isinstance(event, BotText):
        return Said("bot", event.piece)
    if isinstance(event, BotSpeech):
        return Speech("bot", event.speaking)
    if isinstance(event, CallerSpeech):
        return Speech("caller", event.speaking)
    if isinstance(event, PlayFinished):
        return None if event.interrupted else PromptDone(event.id)
    if isinstance(event, ev.TransferProgress) and event.final:
        return TransferDone(ok=200 <= event.code < 300, code=event.code, reason=event.reason)
    return None
