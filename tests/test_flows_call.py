"""Call flows on real calls: `running_server` (the echo engine) runs a bot's flow file while a pjsua2 caller
in another process listens, presses keys (RFC 4733 and SIP INFO) and is transferred; a webhook on a
local HTTP server answers or is dead. What is checked is what a caller and a backend see: the clip
heard (cross-correlation), the REFER and its target, the webhook's body, the hang-up, plus the flow's
transitions on the bus, in the JSON log, beside the recording and in the metrics."""
from __future__ import annotations

import datetime
import http.server
import io
import json
import threading
import time
import wave

import numpy as np
import pytest

from callbot.app.event_log import EventLog
from callbot.app.recording import read_recording
from callbot.app.serve import running_server
from callbot.app.settings import parse_settings
from callbot.engine.contract import FlowTransition, PlayFinished
from callbot.sip import events as ev
from tests.sip_peers import PjsuaPeer, free_port, pumping, serve_config, sidecars

pytestmark = pytest.mark.timeout(180)

RATE = 16000


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (9000 * np.sin(2 * np.pi * freq * t) * np.sin(np.pi * t / seconds)).astype(np.int16)


def _write_wav(path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE), w.writeframes(samples.astype("<i2").tobytes())


def _tone_heard(heard_path, tone: np.ndarray) -> float:
    """The share of a tone clip's audible 10 ms windows that the recording holds, in the stretch of the
    clip's length that holds most: windows where the clip's frequency carries most of the energy. Why not
    a correlation with the clip: a packet the phone's jitter buffer drops or adds mid-tone shifts the rest
    of it by 20 ms, out of phase with the clip (0.77-0.89 seen for a 0.6 s tone the caller heard to its
    end), and a tone's pieces match anywhere along it, so they cannot be placed one by one either."""
    freq = int(np.argmax(np.abs(np.fft.rfft(tone.astype(np.float64))))) * RATE / len(tone)
    win = RATE // 100

    def toned(x: np.ndarray, floor: float) -> np.ndarray:
        frames = x[:len(x) // win * win].astype(np.float64).reshape(-1, win)
        energy = (frames ** 2).sum(axis=1)
        at = np.exp(-2j * np.pi * freq * np.arange(win) / RATE)
        part = 2 * np.abs(frames @ at) ** 2 / win  # the energy at `freq`
        return (part > 0.7 * energy) & (energy > floor ** 2 * win)

    audible = toned(tone, 300).sum()
    heard = toned(_heard(heard_path), 100).astype(np.int64)
    span = -(-len(tone) // win)
    if len(heard) < span:
        return 0.0
    best = np.convolve(heard, np.ones(span, np.int64), "valid").max()
    return float(min(best, audible) / audible)


def _without_dc(x: np.ndarray) -> np.ndarray:
    """`x` less its 20 ms moving average: a DC offset elsewhere in the call (a random-weight model's output)
    must not hide a clip that is there."""
    x = x.astype(np.float64)
    return x - np.convolve(x, np.ones(RATE // 50) / (RATE // 50), "same")


def _heard(heard_path) -> np.ndarray:
    """A recording at RATE, for _best_match (_without_dc)."""
    with wave.open(str(heard_path)) as w:
        heard = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        rate = w.getframerate()
    if rate != RATE:
        import soxr

        heard = soxr.resample(heard, rate, RATE)
    return _without_dc(heard)


def _best_match(heard: np.ndarray, clip: np.ndarray) -> tuple[float, int]:
    """The clip's best normalized correlation in `heard` (from _heard), and the sample where it lies."""
    ref = _without_dc(clip)
    if len(heard) < len(ref):
        return 0.0, 0
    norms = np.sqrt(np.convolve(heard ** 2, np.ones(len(ref)), "valid"))
    scores = np.correlate(heard, ref, "valid") / (np.linalg.norm(ref) * norms + 1e-9)
    at = int(np.argmax(scores))
    return float(scores[at]), at


def _heard_in_order(heard_path, clip: np.ndarray, pieces: int = 4) -> float:
    """The worst correlation of the clip's `pieces` quarters, each found in the recording, in order (0.0
    when out of order). Why not the whole clip at once: the phone's jitter buffer may drop or add a
    packet's worth while the clip plays (it adapts under load), and one correlation over the whole then
    falls (0.54, seen in CI, each quarter 0.94-1.0) although the caller heard all of it."""
    heard, n = _heard(heard_path), len(clip)
    found = [_best_match(heard, clip[k * n // pieces:(k + 1) * n // pieces]) for k in range(pieces)]
    starts = [at for _, at in found]
    return min(score for score, _ in found) if starts == sorted(starts) else 0.0


class Backend(http.server.BaseHTTPRequestHandler):
    """The webhook's backend: notes each body, answers with the reply the test set."""

    bodies: list = []
    reply: dict = {}

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            time.sleep(2.0)  # longer than the state's timeout_s: the flow must not wait for it
        type(self).bodies.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        data = json.dumps(type(self).reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


FLOW = """
start = "greet"
[hours]
timezone = "UTC"
open = {{ mon = "00:00-24:00", tue = "00:00-24:00", wed = "00:00-24:00", thu = "00:00-24:00", fri = "00:00-24:00", sat = "00:00-24:00", sun = "00:00-24:00" }}
[states.greet]
play = "greet.wav"
next = "menu"
[states.menu]
play = "menu.wav"
gather = {{ max_digits = 1, timeout_s = 1.0, interdigit_timeout_s = 1.0 }}
reprompts = 1
on_digits = {{ "1" = "lookup", "2" = "agent", "3" = "dead", "4" = "card", "5" = "slow" }}
on_no_input = "goodbye"
on_no_match = "goodbye"
[states.lookup]
webhook = {{ url = "http://127.0.0.1:{hook}/lookup", timeout_s = 3, retries = 0, headers_env = {{ Authorization = "CALLBOT_TEST_HOOK_TOKEN" }} }}
next = "goodbye"
[states.dead]
webhook = {{ url = "http://127.0.0.1:{dead}/lookup", timeout_s = 1, retries = 1, on_failure = "agent" }}
next = "goodbye"
[states.card]
play = "menu.wav"
gather = {{ max_digits = 16, timeout_s = 5, interdigit_timeout_s = 3, finish_key = "#", variable = "card", sensitive = true }}
next = "pay"
[states.pay]
webhook = {{ url = "http://127.0.0.1:{hook}/pay", timeout_s = 3, retries = 0, headers_env = {{ Authorization = "CALLBOT_TEST_HOOK_TOKEN" }} }}
next = "goodbye"
[states.slow]
webhook = {{ url = "http://127.0.0.1:{hook}/slow", timeout_s = 0.5, retries = 0, on_failure = "goodbye" }}
next = "thanks"
[states.thanks]
play = "bye.wav"
hangup = true
[states.agent]
transfer = "{agent}"
on_transfer_failed = "goodbye"
[states.goodbye]
play = "bye.wav"
hangup = true
"""

BOT = """
[[bots]]
name = "support"
flow = "support.toml"
"""

CLIPS = {"greet": _tone(440, 0.6), "menu": _tone(660, 0.4), "bye": _tone(550, 0.5)}


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """The server with the flow, a transfer target and a webhook backend; yields what tests need."""
    tmp = tmp_path_factory.mktemp("flows")
    for name, clip in CLIPS.items():
        _write_wav(tmp / f"{name}.wav", clip)
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    dead = free_port(__import__("socket").SOCK_STREAM)  # nothing listens there
    log = io.StringIO()
    with PjsuaPeer(user="agent", log_dir=tmp) as agent:
        (tmp / "support.toml").write_text(FLOW.format(hook=backend.server_address[1], dead=dead, agent=agent.uri))
        cfg = serve_config(tmp, 0, user="menu", codecs=("G722/16000",), analytics=True, tail=BOT)
        settings = parse_settings(cfg.read_bytes(), base_dir=tmp)
        with running_server(settings, "echo", log=EventLog(log)) as server, pumping(server):
            yield server, agent, tmp, log
    backend.shutdown()


class Watch:
    """A bus subscription that keeps what it took, so a wait never loses an event another wait needs."""

    def __init__(self, bus, name: str):
        self.bus = bus
        self.sub = bus.subscribe(name)
        self.seen: list = []

    def until(self, found, timeout: float = 30.0, what: str = "event"):
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.seen):
                if found(self.seen[i]):
                    return self.seen[i]
                i += 1
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            e = self.sub.get(0.1)
            if e is not None:
                self.seen.append(e)

    def moves(self, call_id: str, until, timeout: float = 30.0) -> list[FlowTransition]:
        """The call's flow transitions from its start, once one of them satisfies `until`."""
        self.until(lambda e: isinstance(e, FlowTransition) and e.call_id == call_id and until(e), timeout,
                   f"flow transition of {call_id}")
        return [e for e in self.seen if isinstance(e, FlowTransition) and e.call_id == call_id]

    def ended(self, call_id: str, timeout: float = 20.0) -> ev.CallEnded:
        return self.until(lambda e: isinstance(e, ev.CallEnded) and e.call_id == call_id, timeout, "CallEnded")

    def close(self) -> None:
        self.bus.unsubscribe(self.sub)


def _path(moves) -> list[tuple[str, str]]:
    return [(m.to_state, m.reason) for m in moves]


def test_a_digit_by_rfc4733_takes_the_menu_to_a_transfer_the_caller_hears_the_greeting(line, tmp_path):
    server, agent, tmp, log = line
    watch = Watch(server.bus, "test-transfer")
    with PjsuaPeer(user="alice", log_dir=tmp_path) as alice:
        call_id = alice.call(server.endpoint.account_uri())
        alice.expect("state", call_id=call_id, state="CONFIRMED")
        alice.send("record", path=str(tmp_path / "heard.wav"))
        moves = watch.moves(call_id, lambda m: m.to_state == "menu")
        assert [(m.from_state, m.to_state, m.reason) for m in moves] == [("", "greet", "start"),
                                                                          ("greet", "menu", "next")]
        # the menu prompt played to its end, then a key
        watch.until(lambda e: isinstance(e, PlayFinished) and e.call_id == call_id and e.id.endswith("-2"),
                    what="the menu prompt's end")
        alice.send("dtmf", digits="2", method="rfc4733")
        moves = watch.moves(call_id, lambda m: m.reason == "transfer")
        assert (moves[2].to_state, moves[2].reason, moves[2].detail) == ("agent", "digits", "2")
        assert alice.expect("transfer_request", call_id=call_id)["dest"].strip("<>") == agent.uri
        agent.expect("incoming", timeout=15)
        assert watch.ended(call_id).cause == "transfer"
        moves = watch.moves(call_id, lambda m: m.to_state == "")
        assert moves[-1].reason == "transfer" and moves[-1].from_state == "agent"
    [sidecar] = [p for p in sidecars(tmp / "calls") if json.loads(p.read_text())["call_id"] == call_id]
    flow = json.loads(sidecar.read_text())["flow"]
    assert flow["name"] == "support" and flow["path"] == ["greet", "menu", "agent"]
    assert _tone_heard(tmp_path / "heard.wav", CLIPS["greet"]) > 0.9
    # the menu prompt, but for its last 100 ms: the key, pressed as our side finished the prompt, transfers
    # the call while they may still be in the caller's jitter buffer (87 ms of it missing seen)
    menu = CLIPS["menu"]
    assert _tone_heard(tmp_path / "heard.wav", menu[:len(menu) * 3 // 4]) > 0.9
    logged = [json.loads(x) for x in log.getvalue().splitlines()]
    assert ("greet", "menu") in [(x["from_state"], x["to_state"]) for x in logged
                                 if x["event"] == "FlowTransition" and x["call_id"] == call_id]
    watch.close()


def test_a_digit_by_sip_info_calls_the_webhook_with_the_calls_variables(line, tmp_path, monkeypatch):
    server, _, _, _ = line
    monkeypatch.setenv("CALLBOT_TEST_HOOK_TOKEN", "Bearer s3cret")
    Backend.bodies.clear()
    Backend.reply = {"next": "thanks", "variables": {"plan": "gold"}}
    watch = Watch(server.bus, "test-webhook")
    with PjsuaPeer(user="bob", log_dir=tmp_path) as bob:
        call_id = bob.call(server.endpoint.account_uri())
        watch.moves(call_id, lambda m: m.to_state == "menu")
        bob.send("dtmf", digits="1", method="info")
        moves = watch.moves(call_id, lambda m: m.to_state == "thanks")
        assert _path(moves)[2:] == [("lookup", "digits"), ("thanks", "webhook")]
        ended = watch.ended(call_id)
        assert ended.cause == "local"  # the bot hung up after the goodbye clip
        bob.expect("disconnected", call_id=call_id)
    [(path, auth, body)] = Backend.bodies
    assert path == "/lookup" and auth == "Bearer s3cret"
    assert body["call_id"] == call_id and body["digits"] == "1" and body["bot"] == "support"
    assert body["called"] == "menu"
    # business hours ([hours]) go by the wall clock the host gives the runner: today's date, open
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert body["open"] == "yes" and body["local_date"] in {str(today), str(today - datetime.timedelta(days=1))}
    flows = server.flows
    assert flows is not None and flows.errors == 0
    watch.close()


def test_no_input_and_no_match_reprompt_then_exit_and_dead_or_slow_webhooks_take_their_failure_exit(line, tmp_path):
    server, agent, tmp, _ = line
    watch = Watch(server.bus, "test-no-input")
    with PjsuaPeer(user="carol", log_dir=tmp_path) as carol:
        call_id = carol.call(server.endpoint.account_uri())
        moves = watch.moves(call_id, lambda m: m.to_state == "")
        assert _path(moves) == [("greet", "start"), ("menu", "next"), ("menu", "reprompt"), ("goodbye", "no_input"),
                                ("", "hangup")]
        watch.ended(call_id)
    with PjsuaPeer(user="dave", log_dir=tmp_path) as dave:
        call_id = dave.call(server.endpoint.account_uri())
        watch.moves(call_id, lambda m: m.to_state == "menu")
        dave.send("dtmf", digits="3", method="rfc4733")
        moves = watch.moves(call_id, lambda m: m.reason == "webhook_failed")
        assert moves[-1].to_state == "agent" and "127.0.0.1" in moves[-1].detail
        watch.ended(call_id)
    with PjsuaPeer(user="frank", log_dir=tmp_path) as frank:  # a slow backend: its timeout, then the failure exit
        call_id = frank.call(server.endpoint.account_uri())
        watch.moves(call_id, lambda m: m.to_state == "menu")
        frank.send("dtmf", digits="5", method="rfc4733")
        moves = watch.moves(call_id, lambda m: m.reason == "webhook_failed")
        assert moves[-1].to_state == "goodbye" and "no answer within 0.5 s" in moves[-1].detail
        watch.ended(call_id)
    with PjsuaPeer(user="gina", log_dir=tmp_path) as gina:  # no match twice: one reprompt, then its exit
        call_id = gina.call(server.endpoint.account_uri())
        watch.moves(call_id, lambda m: m.to_state == "menu")
        gina.send("dtmf", digits="9", method="rfc4733")
        watch.moves(call_id, lambda m: m.reason == "reprompt")
        gina.send("dtmf", digits="8", method="rfc4733")
        moves = watch.moves(call_id, lambda m: m.reason == "no_match")
        assert _path(moves)[2:] == [("menu", "reprompt"), ("goodbye", "no_match")]
        assert [m.detail for m in moves[2:]] == ["no_match 1/1", "8"]
        watch.ended(call_id)
    watch.close()
    # every call's transitions went beside its recording, and the metrics counted them by state and reason
    events = [json.loads(x) for p in (tmp / "calls").glob("*.events.jsonl") for x in p.read_text().splitlines()]
    assert any(e["event"] == "FlowTransition" and e["reason"] == "no_input" for e in events)
    metric = server.metrics.flow_transitions.labels("support", "goodbye", "no_input")
    assert metric._value.get() >= 1


def test_card_digits_in_a_sensitive_gather_reach_only_the_webhook(line, tmp_path, monkeypatch):
    """PCI: the digits of a card typed into a sensitive gather are in no log, record or events file, only
    in the flow's variables for the payment webhook; the digits before and after are kept as usual."""
    server, _, tmp, log = line
    monkeypatch.setenv("CALLBOT_TEST_HOOK_TOKEN", "Bearer s3cret")
    Backend.bodies.clear()
    Backend.reply = {"next": "thanks"}
    watch = Watch(server.bus, "test-card")
    card = "4111111111111111"
    t = np.arange(RATE * 20) / RATE
    _write_wav(tmp_path / "talk.wav", (6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))  # never quiet
    with PjsuaPeer(user="erin", log_dir=tmp_path) as erin:
        call_id = erin.call(server.endpoint.account_uri())
        erin.expect("state", call_id=call_id, state="CONFIRMED")
        erin.send("play", path=str(tmp_path / "talk.wav"))
        watch.moves(call_id, lambda m: m.to_state == "menu")
        erin.send("dtmf", digits="4", method="info")
        watch.moves(call_id, lambda m: m.to_state == "card")
        erin.send("dtmf", digits=card, method="rfc4733")  # 16 digits: max_digits ends the gathering
        moves = watch.moves(call_id, lambda m: m.to_state == "thanks")
        assert ("pay", "digits", "x" * 16) in [(m.to_state, m.reason, m.detail) for m in moves]
        watch.ended(call_id)
    [(path, _, body)] = Backend.bodies
    assert path == "/pay" and body["card"] == card
    [sidecar] = [p for p in sidecars(tmp / "calls") if json.loads(p.read_text())["call_id"] == call_id]
    record = json.loads(sidecar.read_text())
    assert [d["digit"] for d in record["dtmf"]] == ["4"] + ["x"] * 16  # the menu choice kept, the card masked
    files = sidecar.read_text() + (tmp / "calls" / record["events"]).read_text()
    mine = [x for x in log.getvalue().splitlines() if call_id in x]
    # the card whole, or its digits one by one (a "4111" alone also turned up inside a clock reading once)
    assert card not in files and not any(card in x for x in mine)
    assert '"digit":"1"' not in files.replace(" ", "") and not any('"digit":"1"' in x.replace(" ", "") for x in mine)
    digits = [json.loads(x) for x in mine if '"DtmfReceived"' in x]
    assert [d["digit"] for d in digits] == ["4"] + ["x"] * 16 and all(d["redacted"] for d in digits[1:])
    # the recording kept the caller before, and nothing of them from the card on (redaction lasts the
    # gather's interdigit timeout past it, longer than this call)
    rate, frames = read_recording(sidecar.parent / record["recording"]["wav"])
    caller = frames[:, 0]
    loud = np.flatnonzero(np.abs(caller) > 1000)
    inside = caller[loud[0]:]
    zeros = np.diff(np.flatnonzero(np.concatenate([[1], inside != 0, [1]])))  # runs of exact zeros, +1
    assert loud.size and zeros.max() - 1 > rate // 2, "no stretch of the call with the caller blanked"
    watch.close()
