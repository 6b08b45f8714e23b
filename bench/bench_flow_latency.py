"""Call flows, caller-perceived: a key pressed (RFC 4733) -> the first sample of the next prompt heard, for our
flow (`on_digits = { "1" = "next" }`) against the Twilio-style menu (`<Gather action=URL>`: the digits go to
the app over HTTP, the app's reply names the next prompt), measured in the same calls.

Why this shape (issue 12, BENCHMARKS.md "Call flows: digit to next prompt"):
- End to end, at the caller's ear: `callbot serve`'s parts (`running_server`, the echo engine, the flow host)
  in this process, a pjsua2 caller in its own (tests/peer_pjsua.py) that records what it hears from the
  call's start and presses keys; the next prompt's onset is found in that recording by correlation with
  the known clip (a chirp: its correlation peak is one sample wide, a tone's repeats every period).
- Both variants ALTERNATE within each call (menu_a -> reply_a -> menu_b -> hook -> reply_b -> menu_a ...):
  the peer's adaptive jitter buffer and the recording's placement are shared, so differences between the
  variants are theirs (calls measured one after the other differ by up to 40 ms for the jitter buffers
  alone: BENCHMARKS.md "Latency").
- One clock: every process stamps CLOCK_MONOTONIC (time.monotonic, callbot's now_ns). The peer says when
  a key went to its stream and when its recorder was connected (`t` of its "ok" events); the recorder's
  first sample is the peer bridge's next 20 ms tick after that. That tick's phase comes from the digits
  themselves: an RFC 4733 packet leaves on the peer's next tick and pjsip hands it to the server's SIP
  thread on arrival (DtmfReceived.at), so the arrival times, modulo 20 ms, cluster at the peer's tick
  phase (plus loopback; the cluster's width is reported). Checked once against a packet capture on lo
  (the caller's own RTP and a click it played into both the call and its recorder): the recording's
  first sample placed within 0.4 ms, the digits' send phase within 1 ms.
- Stages, each a timestamp on that clock: key -> the server has the digit (DtmfReceived.at: the peer's
  wait for its next packet, loopback) -> the flow issues the Play (ours: bus, flow thread, runner, clip
  read; variant b adds the webhook's HTTP round trip) -> the echo engine pushes the clip's first frame
  into tx (it steps on the caller's 20 ms frames: a Play waits for the next one) -> the server's bridge
  takes it (CallAudio.departure_ns: the bridge tick; tx held nothing ahead of the clip, so it starts its
  packet) -> heard (encode, RTP, the peer's wait for its own tick, jitter buffer; for PCMU pjmedia's
  8 <-> 16 kHz resampling on both sides). A session tap (the echo session's `control` and CallAudio's
  `push`, as bench/latency_lab.py taps clicks) takes the middle stamps; nothing of the product is changed.
- Each call is a new caller process, so a new phase between its 20 ms tick and the server's: that phase
  decides how long a digit's answer waits for the server's next frame, and whether the webhook's few ms
  cost nothing or a whole frame, so the results pool several calls.

Run (about 1.5 min; not part of CI):
    .venv/bin/python -m pytest bench/bench_flow_latency.py -p no:cacheprovider -q -s
    CALLBOT_BENCH_FLOW_CALLS=10 CALLBOT_BENCH_FLOW_ROUNDS=8 ...   calls per codec (default 8), key presses
                                                                per variant and call (default 3)
"""
from __future__ import annotations

import http.server
import io
import json
import os
import random
import subprocess
import threading
import time
import wave

import numpy as np
import pytest

from callbot.app.event_log import EventLog
from callbot.app.serve import running_server
from callbot.app.settings import parse_settings
from callbot.engine.contract import FlowTransition, Play, PlayFinished
from callbot.engine.serving.call_audio import CallAudio
from callbot.sip import events as ev
from tests.sip_peers import PjsuaPeer, pumping, serve_config

pytestmark = pytest.mark.timeout(300)

CALLS = int(os.environ.get("CALLBOT_BENCH_FLOW_CALLS", "8"))  # per codec
ROUNDS = int(os.environ.get("CALLBOT_BENCH_FLOW_ROUNDS", "3"))  # key presses per variant and call
RATE = 16000  # the clips', the server's bridge and the peer's bridge (so no clip is resampled for the caller)
TICK_S = 0.020  # pjmedia's bridge tick on both sides (ptime 20 ms)
CODECS = ("G722", "PCMU")
RESULTS: dict[str, dict] = {}


def _chirp(f0: float, f1: float, seconds: float) -> np.ndarray:
    """A linear sweep with 3 ms raised-cosine ends: its first sample is the prompt's onset, found to the
    sample by correlation (inside both codecs' bands: 400-3000 Hz)."""
    n = int(RATE * seconds)
    t = np.arange(n) / RATE
    x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    ramp = int(0.003 * RATE)
    env = np.ones(n)
    env[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    env[-ramp:] = env[:ramp][::-1]
    return np.round(9000 * x * env).astype(np.int16)


CLIPS = {"menu": _chirp(500, 2500, 0.25), "reply": _chirp(3000, 400, 0.25)}
ONSET_SAMPLES = RATE * 60 // 1000  # of the reply, correlated to find its onset
# below this correlation the caller's jitter buffer dropped or concealed a frame at the onset itself: that
# key press is counted as unclear and left out (as bench_latency.py leaves out a click it cannot place)
ONSET_MIN = 0.9

FLOW = """
start = "menu_a"
# (a) our flow: the digit picks the next state in the flow file
[states.menu_a]
play = "menu.wav"
gather = {{ max_digits = 1, timeout_s = 8 }}
reprompts = 0
on_digits = {{ "1" = "reply_a" }}
on_no_input = "bye"
on_no_match = "bye"
[states.reply_a]
play = "reply.wav"
next = "menu_b"
# (b) Twilio-style <Gather action=URL>: the gather names no choice, the app decides over HTTP
[states.menu_b]
play = "menu.wav"
gather = {{ max_digits = 1, timeout_s = 8 }}
reprompts = 0
next = "hook"
on_no_input = "bye"
[states.hook]
webhook = {{ url = "http://127.0.0.1:{port}/gather", timeout_s = 2, retries = 0, on_failure = "bye" }}
next = "bye"
[states.reply_b]
play = "reply.wav"
next = "menu_a"
[states.bye]
hangup = true
"""

BOT = """
[[bots]]
name = "ivr"
flow = "ivr.toml"
"""


class App(http.server.BaseHTTPRequestHandler):
    """The Twilio-style app: the gathered digits in, the next prompt out (`{"next": "reply_b"}`), stamped."""

    stamps: list = []  # (monotonic s when the request was read, when the reply was written)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        t_in = time.monotonic()
        data = json.dumps({"next": "reply_b" if body.get("digits") == "1" else "bye"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        type(self).stamps.append((t_in, time.monotonic()))

    def log_message(self, *args):
        pass


class Taps:
    """The server-side stamps of one call: each Play the flow issues (the echo session's `control`) and
    each clip's first frame pushed into tx and taken by the bridge (CallAudio's `push`, `departure_ns`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.plays: list[float] = []
        # [kind, t_push s, tx position, t_departed s (nan: stamp gone; None: not yet), samples queued ahead]
        self.pushes: list[list] = []


def tap_engine(engine) -> Taps:
    """Every session the echo engine opens stamps into the Taps returned (`reset` between calls); its own
    loop and audio are untouched."""
    taps = Taps()
    firsts = {kind: clip[:RATE * 20 // 1000] for kind, clip in CLIPS.items()}  # a clip's first 20 ms frame

    class TappedAudio(CallAudio):
        def push(self, frame, exact=None):
            queued = self.tx.readable  # samples ahead of this push in tx (the media side reads 20 ms a tick)
            written = super().push(frame, exact=exact)
            now = time.monotonic()
            for row in taps.pushes:  # the bridge has taken an earlier clip start by now (or the stamp is gone)
                if row[3] is None:
                    d = self.departure_ns(row[2])
                    if d != 0:
                        row[3] = d / 1e9 if d > 0 else float("nan")
            if exact is not None and written:
                for kind, first in firsts.items():
                    if len(exact) == len(first) and np.array_equal(exact, first):
                        taps.pushes.append([kind, now, self.last_push_pos, None, queued])
            return written

    original = engine.open_session

    def open_session(start):
        session = original(start)
        assert session.audio.call_rate == RATE, session.audio.call_rate  # clips go out sample-exact
        session.audio.__class__ = TappedAudio
        control = session.control

        def tapped_control(op):
            if isinstance(op, Play):
                taps.plays.append(time.monotonic())
            control(op)

        session.control = tapped_control
        return session

    engine.open_session = open_session
    return taps


class Watch:
    """The bus events of one call, kept in order, so a wait never loses what a later wait needs."""

    def __init__(self, bus):
        self.bus, self.call_id = bus, ""  # the call's id is set once dialled; calls run one at a time
        self.sub = bus.subscribe("bench-flow", accept=lambda e: isinstance(
            e, (FlowTransition, PlayFinished, ev.DtmfReceived, ev.CallEnded)))
        self.seen: list = []
        self.i = 0  # events before this are consumed

    def next(self, found, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            while self.i < len(self.seen):
                e = self.seen[self.i]
                self.i += 1
                if e.call_id != self.call_id:
                    continue
                if isinstance(e, ev.CallEnded):
                    raise AssertionError(f"the call ended ({e.cause}) while waiting for {what}")
                if found(e):
                    return e
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            e = self.sub.get(0.05)
            if e is not None:
                self.seen.append(e)

    def close(self) -> None:
        self.bus.unsubscribe(self.sub)


def _write_wav(path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE), w.writeframes(samples.astype("<i2").tobytes())


def _ok_time(peer: PjsuaPeer, cmd: str, n: int, timeout: float = 5.0) -> float:
    """`t` of the peer's n-th (from 1) "ok" for `cmd`."""
    deadline = time.monotonic() + timeout
    while True:
        oks = peer.all("ok", cmd=cmd)
        if len(oks) >= n:
            return float(oks[n - 1]["t"])
        assert time.monotonic() < deadline, f"no ok #{n} for {cmd} within {timeout} s"
        time.sleep(0.002)


def run_call(server, taps: Taps, codec: str, tmp, n: int) -> dict:
    """Call `n`: ROUNDS pairs of key presses (a, b); returns every stamp, per key press."""
    taps.reset()
    App.stamps.clear()
    heard = tmp / f"heard-{codec}-{n}.wav"
    keys, arrivals, variants = [], [], []
    watch = Watch(server.bus)
    with PjsuaPeer(user=f"caller-{codec.lower()}-{n}", codecs=codec, log_dir=tmp) as peer:
        try:
            call_id = watch.call_id = peer.call(server.endpoint.account_uri())
            peer.expect("state", call_id=call_id, state="CONFIRMED", timeout=15)
            media = peer.expect("media", call_id=call_id, timeout=10)
            assert media["codec"].upper().startswith(codec), media
            peer.send("record", path=str(heard))
            t_record = _ok_time(peer, "record", 1)
            for i in range(2 * ROUNDS):
                variant = "ab"[i % 2]
                watch.next(lambda e: isinstance(e, FlowTransition) and e.to_state == f"menu_{variant}",
                           f"menu_{variant}")
                watch.next(lambda e: isinstance(e, PlayFinished) and not e.interrupted, "the menu prompt's end")
                # the prompt's last frame has left the engine; the caller hears it ~60 ms later and answers
                # after a human-ish pause, at a random phase of both bridges' 20 ms ticks
                time.sleep(random.uniform(0.10, 0.22))
                peer.send("dtmf", digits="1", method="rfc4733")
                keys.append(_ok_time(peer, "dtmf", i + 1))
                arrivals.append(watch.next(lambda e: isinstance(e, ev.DtmfReceived), "the digit").at)
                watch.next(lambda e: isinstance(e, FlowTransition) and e.to_state == f"reply_{variant}",
                           f"reply_{variant}")
                variants.append(variant)
            watch.next(lambda e: isinstance(e, PlayFinished) and not e.interrupted, "the last reply's end")
            time.sleep(0.3)  # the last reply reaches the caller's recording
            peer.send("hangup")
            peer.expect("disconnected", call_id=call_id, timeout=10)
        finally:
            watch.close()
    # the peer has quit: the recording's header is written
    with wave.open(str(heard)) as w:
        assert w.getframerate() == RATE, w.getframerate()
        recording = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    return {"keys": np.array(keys), "arrivals": np.array(arrivals), "variants": variants, "t_record": t_record,
            "recording": recording, "taps": taps, "hooks": list(App.stamps), "media": media}


# ---- analysis ------------------------------------------------------------------------------------------


def tick_phase(arrivals: np.ndarray) -> tuple[float, float]:
    """The peer bridge's tick phase (s, in [0, TICK_S)) from the digits' arrival times, and the cluster's
    width (s): the start of the arc they occupy on the 20 ms circle (after its largest empty gap)."""
    r = np.sort(np.mod(arrivals, TICK_S))
    gaps = np.diff(np.concatenate([r, [r[0] + TICK_S]]))
    k = int(np.argmax(gaps))
    start = r[(k + 1) % len(r)]
    return float(start), float(TICK_S - gaps[k])


def onsets(recording: np.ndarray, clip: np.ndarray, starts: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """For each start sample, where `clip` begins in recording[start:start + span] (best normalized
    correlation) and that correlation."""
    ref = clip.astype(np.float64)
    ref = (ref - ref.mean()) / np.linalg.norm(ref - ref.mean())
    at, score = np.full(len(starts), -1), np.zeros(len(starts))
    for i, s in enumerate(starts):
        seg = recording[max(0, s): max(0, s) + span + len(ref)]
        if len(seg) < len(ref):
            continue
        n = 1 << int(np.ceil(np.log2(len(seg) + len(ref))))
        corr = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(seg) - len(ref) + 1]
        c2 = np.concatenate([[0.0], np.cumsum(seg * seg)])
        c1 = np.concatenate([[0.0], np.cumsum(seg)])
        m = len(ref)
        energy = (c2[m:] - c2[:-m]) - (c1[m:] - c1[:-m]) ** 2 / m  # the window's variance x m
        ncc = corr / np.sqrt(np.maximum(energy, 1e-9))
        j = int(np.argmax(ncc))
        at[i], score[i] = max(0, s) + j, ncc[j]
    return at, score


def _ncc(x: np.ndarray, clip: np.ndarray) -> float:
    """Normalized correlation of `x` with `clip` at lag 0 (0 when `x` is short)."""
    if len(x) < len(clip):
        return 0.0
    a, b = x - x.mean(), clip.astype(np.float64) - clip.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def first_after(times, t: float) -> float:
    later = [x for x in times if x >= t]
    return min(later) if later else float("nan")


def analyse(call: dict) -> dict:
    keys, arrivals = call["keys"], call["arrivals"]
    phase, width = tick_phase(arrivals)
    t_rec = call["t_record"]
    wait = np.mod(phase - t_rec, TICK_S)
    t_first = t_rec + wait  # the recorder's first frame: the peer bridge's first tick after it was connected
    start = np.floor((keys - t_first) * RATE).astype(int)
    # the onset from the clip's first 60 ms (3000 -> 2360 Hz: no part of the menu's sweep), so that a frame
    # the caller's jitter buffer drops or conceals later in the prompt cannot move it
    recording = call["recording"]
    at, score = onsets(recording, CLIPS["reply"][:ONSET_SAMPLES], start, int(0.6 * RATE))
    whole = np.array([_ncc(recording[j:j + len(CLIPS["reply"])], CLIPS["reply"]) for j in at])
    heard = t_first + at / RATE
    taps = call["taps"]
    reply_pushes = [(row[1], row[3]) for row in taps.pushes if row[0] == "reply"]
    rows = []
    for i, v in enumerate(call["variants"]):
        play = first_after(taps.plays, arrivals[i])
        push, departed = next(((p, d) for p, d in reply_pushes if p >= play), (float("nan"), float("nan")))
        hook = next(((a, b) for a, b in call["hooks"] if a >= arrivals[i]), (float("nan"), float("nan")))
        rows.append({"variant": v, "key": keys[i], "arrived": arrivals[i], "play": play, "push": push,
                     "departed": departed if departed is not None else float("nan"), "heard": heard[i],
                     "score": score[i], "hook_in": hook[0] if v == "b" else float("nan"),
                     "hook_out": hook[1] if v == "b" else float("nan")})
    peer_tick = np.mod(phase - keys, TICK_S)  # the key's wait for the peer's next packet
    return {"rows": rows, "phase_width_ms": width * 1e3, "peer_tick_ms": peer_tick * 1e3,
            "codec": call["media"]["codec"],
            "damaged": int((whole < 0.95).sum()),  # replies heard with a glitch past their onset
            "queued_max": max((row[4] for row in taps.pushes), default=0)}


STAGES = (  # (name, from, to): consecutive stamps, so the stages add up to the total
    ("key -> server has the digit", "key", "arrived"),
    ("server -> flow issues the Play (ours)", "arrived", "play"),
    ("Play -> clip's 1st frame pushed", "play", "push"),
    ("pushed -> bridge takes it", "push", "departed"),
    ("bridge -> heard (RTP, peer jitter buf)", "departed", "heard"),
)


def stats(x) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan"), "mean": float("nan")}
    return {"n": int(len(x)), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
            "max": float(x.max()), "mean": float(x.mean())}


def summarize(calls: list[dict]) -> dict:
    """Every call's rows together, per variant: the total, each stage, and the per-call medians."""
    every = [r for a in calls for r in a["rows"]]
    rows = [r for r in every if r["score"] >= ONSET_MIN]
    out = {"phase_width_ms": max(a["phase_width_ms"] for a in calls),
           "min_score": min(r["score"] for r in rows) if rows else 0.0,
           "unclear": {v: sum(1 for r in every if r["variant"] == v and r["score"] < ONSET_MIN) for v in "ab"},
           "codec": calls[0]["codec"], "peer_tick": stats(np.concatenate([a["peer_tick_ms"] for a in calls])),
           "queued_max": max(a["queued_max"] for a in calls), "damaged": sum(a["damaged"] for a in calls)}
    for v in "ab":
        col = {k: np.array([r[k] for r in rows if r["variant"] == v]) for k in rows[0]}
        d = {"total": stats((col["heard"] - col["key"]) * 1e3)}
        for name, f, t in STAGES:
            d[name] = stats((col[t] - col[f]) * 1e3)
        d["pjmedia"] = stats(((col["arrived"] - col["key"]) + (col["heard"] - col["play"])) * 1e3)
        d["from the digit at the server"] = stats((col["heard"] - col["arrived"]) * 1e3)
        if v == "b":
            d["HTTP: request read - digit at server"] = stats((col["hook_in"] - col["arrived"]) * 1e3)
            d["HTTP: reply written -> Play"] = stats((col["play"] - col["hook_out"]) * 1e3)
        d["per call p50"] = [stats([(r["heard"] - r["key"]) * 1e3 for r in a["rows"]
                                    if r["variant"] == v and r["score"] >= ONSET_MIN])["p50"] for a in calls]
        out[v] = d
    return out


# ---- the bench -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow-latency")
    for name, clip in CLIPS.items():
        _write_wav(tmp / f"{name}.wav", clip)
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    (tmp / "ivr.toml").write_text(FLOW.format(port=app.server_address[1]))
    cfg = serve_config(tmp, 0, user="menu", codecs=("G722/16000", "PCMU/8000"), analytics=True, tail=BOT)
    settings = parse_settings(cfg.read_bytes(), base_dir=tmp)
    try:
        with running_server(settings, "echo", log=EventLog(io.StringIO())) as server, pumping(server):
            taps = tap_engine(server.engine)
            yield server, taps, tmp
    finally:
        app.shutdown()


@pytest.mark.parametrize("codec", CODECS)
def test_digit_to_next_prompt(benchmark, line, codec):
    server, taps, tmp = line

    def calls():  # each call a new caller process: a new phase between its 20 ms tick and the server's
        return [analyse(run_call(server, taps, codec, tmp, n)) for n in range(CALLS)]

    analysed = benchmark.pedantic(calls, rounds=1, iterations=1)
    s = summarize(analysed)
    s["loadavg"] = os.getloadavg()[0]
    RESULTS[codec] = s
    a, b = s["a"], s["b"]
    benchmark.extra_info.update({
        "codec": codec, "calls": CALLS, "keys_per_variant": CALLS * ROUNDS, "loadavg": s["loadavg"],
        "ours_ms": [a["total"][q] for q in ("p50", "p95", "max")],
        "twilio_style_ms": [b["total"][q] for q in ("p50", "p95", "max")],
        "ratio_p50": b["total"]["p50"] / a["total"]["p50"], "ratio_p95": b["total"]["p95"] / a["total"]["p95"],
        "decision_ours_ms": a[STAGES[1][0]]["p50"], "decision_twilio_style_ms": b[STAGES[1][0]]["p50"],
        "phase_width_ms": s["phase_width_ms"]})
    assert server.flows is not None and server.flows.errors == 0
    keys = CALLS * ROUNDS
    assert sum(s["unclear"].values()) <= 0.1 * 2 * keys, f"replies with no clear onset: {s['unclear']} of {keys} each"
    # the recording's placement rests on the digits' arrivals marking the caller's tick
    assert s["phase_width_ms"] < 5.0, f"digit arrivals spread {s['phase_width_ms']:.1f} ms around the caller's tick"
    for v in "ab":
        assert s[v]["total"]["n"] == s[v]["pjmedia"]["n"] == keys - s["unclear"][v], s[v]


def _f(st: dict) -> str:
    return f"{st['p50']:6.1f} {st['p95']:6.1f} {st['max']:6.1f}"


def test_report():
    if not RESULTS:
        pytest.skip("run the whole file")
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    lines = [f"digit (RFC 4733) -> first sample of the next prompt at the caller; {CALLS} calls per codec, "
             f"{ROUNDS} keys per variant and call, (a) and (b) alternating; tree {rev}; ms p50 / p95 / max", ""]
    for codec, s in RESULTS.items():
        lines.append(f"{codec} (load {s['loadavg']:.1f}; digit arrivals within {s['phase_width_ms']:.1f} ms of the "
                     f"caller's tick; reply onsets found at correlation >= {s['min_score']:.4f}, unclear (left "
                     f"out) a {s['unclear']['a']} b {s['unclear']['b']}, {s['damaged']} heard with a glitch later "
                     f"on; tx held {s['queued_max']} samples ahead of a clip's first frame at most)")
        lines.append(f"  {'stage':<44} {'(a) our flow':>20}   {'(b) Twilio-style':>20}   b-a p50   mean")
        names = ["total"] + [n for n, _, _ in STAGES] + ["pjmedia", "from the digit at the server"]
        for name in names:
            a, b = s["a"][name], s["b"][name]
            label = {"total": "TOTAL: key -> next prompt heard",
                     "pjmedia": "  pjmedia + loopback (all but ours)",
                     "from the digit at the server": "  digit at the server -> heard"}.get(name, "  " + name)
            lines.append(f"  {label:<44} {_f(a)}   {_f(b)}   {b['p50'] - a['p50']:+6.1f} {b['mean'] - a['mean']:+6.1f}")
        for name in ("HTTP: request read - digit at server", "HTTP: reply written -> Play"):
            lines.append(f"  {'    (b) ' + name:<44} {'':>20}   {_f(s['b'][name])}")
        lines.append(f"  {'  (of the first: the key waits for its packet)':<44} {_f(s['peer_tick'])}")
        ta, tb = s["a"]["total"], s["b"]["total"]
        oa, ob = s["a"][STAGES[1][0]], s["b"][STAGES[1][0]]
        lines.append(f"  ratio (b)/(a): total p50 {tb['p50'] / ta['p50']:.3f}x, p95 {tb['p95'] / ta['p95']:.3f}x; "
                     f"the decision (ours) p50 {ob['p50'] / oa['p50']:.2f}x, p95 {ob['p95'] / oa['p95']:.2f}x")
        lines.append("  per call p50, a / b: " + ", ".join(f"{x:.1f} / {y:.1f}" for x, y in
                                                         zip(s["a"]["per call p50"], s["b"]["per call p50"])))
        lines.append("")
    print("\n" + "\n".join(lines))
