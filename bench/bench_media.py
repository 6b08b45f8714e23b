"""Media callback bench: what one 20 ms frame costs in our callbacks, and how late the callbacks run
while another thread holds the GIL the way the model's step will.

Why: the pjmedia clock thread must take the GIL to call our Python-level port; a thread that keeps the
GIL busy (an MLX step builds its graph in Python) delays every call's audio by up to the interpreter's
switch interval (5 ms by default). The rule (docs/latency.md, "The GIL and the media clock"): p99
lateness > 2 ms means inference moves to its
own process with the rings in shared memory. These numbers decide it (BENCHMARKS.md, "## Media callback").

Run:  /work/venv/bin/python -m pytest bench/bench_media.py -p no:cacheprovider -s
      CALLBOT_BENCH_FULL=1 ... for 60 s per scenario (default 5 s).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import numpy as np
import pjsua2 as pj
import pytest

from callbot.engine import Ring
from callbot.sip._pcm import MediaPump
from callbot.app.calls import CallRouter
from callbot.engine.contract import CallStart
from callbot.engine.serving.echo import EchoEngine
from callbot.sip import media_port
from callbot.sip.media_port import attach_media

FULL = os.environ.get("CALLBOT_BENCH_FULL") == "1"
CALL_S = 60.0 if FULL else 5.0
RATE = 16000
N = RATE // 50  # samples per 20 ms frame
TICK_NS = 20_000_000


# ---- 1. cost of moving one frame: Cython pump vs pure Python ---------------------------------------


def received_frame():
    f = pj.MediaFrame()
    f.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    f.buf = pj.ByteVector(np.arange(N, dtype=np.int16).tobytes())
    f.size = 2 * N
    return f


def requested_frame():
    f = pj.MediaFrame()
    f.size = 2 * N
    return f


def py_received(rx: Ring, frame) -> None:
    """The best pure-Python way we found: ByteVector -> bytes (element by element) -> numpy -> ring."""
    rx.write(np.frombuffer(bytes(frame.buf), np.int16))


def py_requested(tx: Ring, frame) -> None:
    """Pure Python: ring -> numpy -> bytes -> a new ByteVector (element by element) -> the frame."""
    pcm = tx.read(N)
    frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    frame.buf = pj.ByteVector(pcm.tobytes() if pcm is not None else bytes(2 * N))


@pytest.fixture
def rings():
    return Ring(1 << 16, "int16"), Ring(1 << 16, "int16")


@pytest.mark.benchmark(group="frame received (20 ms at 16 kHz)")
def test_received_cython(benchmark, rings):
    rx, tx = rings
    pump, frame = MediaPump(rx, tx, N), received_frame()

    def run():
        pump.received(frame)
        rx.read(N)

    benchmark(run)


@pytest.mark.benchmark(group="frame received (20 ms at 16 kHz)")
def test_received_python(benchmark, rings):
    rx, _ = rings
    frame = received_frame()

    def run():
        py_received(rx, frame)
        rx.read(N)

    benchmark(run)


@pytest.mark.benchmark(group="frame requested (20 ms at 16 kHz)")
def test_requested_cython(benchmark, rings):
    rx, tx = rings
    pump = MediaPump(rx, tx, N)
    pcm = np.arange(N, dtype=np.int16)

    def setup():
        tx.write(pcm)
        return (requested_frame(),), {}

    benchmark.pedantic(pump.requested, setup=setup, rounds=3000, warmup_rounds=50)


@pytest.mark.benchmark(group="frame requested (20 ms at 16 kHz)")
def test_requested_python(benchmark, rings):
    _, tx = rings
    pcm = np.arange(N, dtype=np.int16)

    def setup():
        tx.write(pcm)
        return (tx, requested_frame()), {}

    benchmark.pedantic(py_requested, setup=setup, rounds=3000, warmup_rounds=50)


# ---- 2. lateness of the callbacks over a call, idle and with a GIL-heavy thread --------------------


class TimedRingPort(media_port._RingPort):
    """The production port with a timestamp around each callback, into preallocated arrays."""

    def __init__(self, pump, frames):
        super().__init__(pump)
        del self.onFrameReceived, self.onFrameRequested  # back to the (timed) class methods
        self.t_req = np.zeros(frames, np.int64)
        self.cost = np.zeros(2 * frames, np.int64)
        self.k = 0
        self.c = 0

    def onFrameRequested(self, frame):
        t0 = time.perf_counter_ns()
        self.pump.requested(frame)
        t1 = time.perf_counter_ns()
        if self.k < len(self.t_req):
            self.t_req[self.k] = t0
            self.k += 1
        if self.c < len(self.cost):
            self.cost[self.c] = t1 - t0
            self.c += 1

    def onFrameReceived(self, frame):
        t0 = time.perf_counter_ns()
        self.pump.received(frame)
        t1 = time.perf_counter_ns()
        if self.c < len(self.cost):
            self.cost[self.c] = t1 - t0
            self.c += 1


def c_peer():
    """Stands for the call's stream: a C-level port (a looping tone), as a call's AudioMedia is, so
    that our two callbacks are the only ones on the bridge that need the GIL."""
    tone = pj.ToneGenerator()
    tone.createToneGenerator(RATE, 1)
    desc = pj.ToneDesc()
    desc.freq1, desc.freq2, desc.on_msec, desc.off_msec, desc.volume = 440, 0, 200, 800, 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)
    return tone


class Load:
    """One thread that does what the current scenario says: nothing, pure Python, or an MLX step."""

    def __init__(self):
        import mlx.core as mx

        self.mx = mx
        self.w = [mx.random.normal((256, 256)) for _ in range(8)]
        self.x = mx.random.normal((1, 256))
        mx.eval(self.w, self.x)
        self.mode = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            mode = self.mode
            if mode == "python":  # pure-Python work that never releases the GIL of its own accord
                acc = 0
                for i in range(20000):
                    acc += i * i
            elif mode == "mlx":  # an MLX step's shape: many small ops built in Python, then eval
                h = self.x
                for _ in range(100):
                    for wi in self.w:
                        h = self.mx.tanh(h @ wi)
                self.mx.eval(h)
            else:
                self.stop.wait(0.002)

    def close(self):
        self.stop.set()
        self.thread.join(10)


# (name, what the load thread does, sys.setswitchinterval)
SCENARIOS = [
    ("idle", None, 0.005),
    ("python thread, switch 5 ms", "python", 0.005),
    ("python thread, switch 1 ms", "python", 0.001),
    ("mlx thread, switch 5 ms", "mlx", 0.005),
    ("mlx thread, switch 1 ms", "mlx", 0.001),
]
SEGMENT_S = 2.0  # the scenarios take turns in segments this long, so background load hits all alike
SETTLE_TICKS = 5  # ticks after a switch that belong to no scenario


@pytest.fixture
def endpoint():
    """One pjsua2 endpoint per process: this one is gone before the round-trip bench starts its own."""
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = 1
    cfg.logConfig.consoleLevel = 1
    cfg.uaConfig.threadCnt = 0
    cfg.medConfig.clockRate = RATE
    cfg.medConfig.sndClockRate = RATE
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    ep.libStart()
    yield ep
    gc.collect()
    ep.libDestroy()


def Info() -> CallStart:
    return CallStart(call_id="bench", rate=RATE)


def run_call(seconds_each: float, calls: int = 1, engine=None, scenarios=SCENARIOS) -> dict:
    """`calls` calls at once (the first one timed) on `engine` (None: an EchoEngine of its own); the
    scenarios take turns every SEGMENT_S; returns per-scenario lateness and cost. Every call's two
    callbacks take the GIL once per tick."""
    rounds = max(1, round(seconds_each / SEGMENT_S))
    frames = int(rounds * len(scenarios) * SEGMENT_S * 50) + 200
    old_switch = sys.getswitchinterval()
    own_engine = engine is None
    engine = EchoEngine() if own_engine else engine
    session = engine.open_session(Info())
    peer = c_peer()
    att = attach_media(peer, RATE, session)
    att.detach()  # swap in the timed port: same pump, same rings
    port = TimedRingPort(att.pump, frames)
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, RATE, 1, 20000, 16)
    port.createPort("timed", fmt)
    others = []  # the other calls: real ports, untimed
    for _ in range(calls - 1):
        s2 = engine.open_session(Info())
        p2 = c_peer()
        others.append((s2, p2, attach_media(p2, RATE, s2)))
    load = Load()
    segments = []  # (start ns, scenario index)
    try:
        peer.startTransmit(port)
        port.startTransmit(peer)
        time.sleep(0.2)
        for _ in range(rounds):
            for i, (_, mode, switch) in enumerate(scenarios):
                sys.setswitchinterval(switch)
                load.mode = mode
                segments.append((time.perf_counter_ns(), i))
                time.sleep(SEGMENT_S)
        segments.append((time.perf_counter_ns(), -1))
        load.mode = None
        peer.stopTransmit(port)
        port.stopTransmit(peer)
    finally:
        load.close()
        sys.setswitchinterval(old_switch)
        for s2, p2, a2 in others:
            a2.detach()
            engine.close_session(s2)
        others.clear()
    t = port.t_req[: port.k].astype(np.int64)
    # lateness against the ideal 20 ms grid, anchored anew in each 2 s segment at its earliest tick:
    # one stall of the whole machine (or a tick pjmedia's clock drops to catch up) then spoils only
    # the segment it falls in instead of shifting every later tick
    offset = (t - np.arange(len(t)) * TICK_NS).astype(np.float64)
    starts = np.array([s for s, _ in segments])
    seg_of_tick = np.searchsorted(starts, t, side="right") - 1
    late = np.full(len(t), np.nan)
    for j in range(len(segments) - 1):
        ticks = np.flatnonzero(seg_of_tick == j)
        if len(ticks):
            late[ticks] = offset[ticks] - offset[ticks].min()
    results = {}
    for i, (name, _, _) in enumerate(scenarios):
        picks = []
        for j, (s0, idx) in enumerate(segments[:-1]):
            if idx == i:
                ticks = np.flatnonzero(seg_of_tick == j)[SETTLE_TICKS:]
                picks.append(ticks)
        ticks = np.concatenate(picks)
        lt = late[ticks]
        gaps = np.diff(t)[ticks[ticks < len(t) - 1]]
        results[name] = {
            "frames": int(len(ticks)),
            "late_p50_ms": float(np.percentile(lt, 50) / 1e6),
            "late_p99_ms": float(np.percentile(lt, 99) / 1e6),
            "late_max_ms": float(lt.max() / 1e6),
            "interval_max_ms": float(gaps.max() / 1e6),
        }
    cost = port.cost[10 : port.c] / 1000.0
    results["callback cost"] = {"p50_us": float(np.percentile(cost, 50)), "p99_us": float(np.percentile(cost, 99)),
                                "max_us": float(cost.max()), "underruns": int(att.pump.tx_underruns)}
    engine.close_session(session)
    if own_engine:
        engine.close()
    del port, peer, att
    gc.collect()
    return results


@pytest.mark.timeout(CALL_S * len(SCENARIOS) * 2 + 120)
@pytest.mark.parametrize("calls", [1, 4])
def test_callback_lateness_over_a_call(benchmark, endpoint, calls):
    """`calls` calls (4: the wheel's limit), every scenario in turns: lateness of onFrameRequested
    against the ideal 20 ms grid."""
    results = {}

    def run():
        results.update(run_call(CALL_S, calls))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    cost = results.pop("callback cost")
    print(f"\ncallback lateness with {calls} call(s), {CALL_S:.0f} s per scenario in {SEGMENT_S:.0f} s turns "
          "(16 kHz bridge, echo engine on the calls)")
    print(f"{'scenario':30s} {'late p50':>9s} {'p99':>8s} {'max':>8s} {'gap max':>8s} {'p99 vs idle':>12s}")
    idle = results["idle"]
    for name, r in results.items():
        print(
            f"{name:30s} {r['late_p50_ms']:7.2f}ms {r['late_p99_ms']:6.2f}ms {r['late_max_ms']:6.2f}ms "
            f"{r['interval_max_ms']:6.2f}ms {r['late_p99_ms'] / max(idle['late_p99_ms'], 1e-3):11.1f}x"
        )
    print(f"our callbacks' own cost over the call: p50 {cost['p50_us']:.1f} us, p99 {cost['p99_us']:.1f} us, "
          f"max {cost['max_us']:.0f} us; tx underruns {cost['underruns']}")


@pytest.mark.timeout(CALL_S * 4 + 300)
def test_callback_lateness_with_the_model_in_its_own_process(benchmark, endpoint, tmp_path):
    """What `callbot serve` runs: 4 calls whose engine is the InferenceProcess (the tiny model stepping
    every call in a spawned child; rings in shared memory), against the same 4 calls on the echo engine
    (idle) in the same run. The media process runs no Python beside the callbacks: lateness should stay
    at idle's, whatever the child does with its core."""
    import functools

    import latency_lab as L
    from callbot.engine.serving.inference_process import InferenceProcess

    directory, how, label = L.bench_model_source(tmp_path)
    results, got = {}, []

    def run():
        results["idle (echo engine)"] = run_call(CALL_S, 4)["idle"]
        model = InferenceProcess(functools.partial(L.model_setup, directory, how))
        try:
            for name, realtime in (("model, clock thread as is", False), ("model, clock thread real-time", True)):
                # as the Endpoint does at start (sip/media_port.py); the clock thread is promoted on its
                # next frame, and a thread once promoted stays so: the plain case runs first
                if realtime:
                    media_port.make_media_clock_realtime(got.append)
                try:
                    results[name] = run_call(CALL_S, 4, model, [(name, None, 0.005)])[name]
                finally:
                    media_port.leave_media_clock_alone()
        finally:
            model.close()

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    idle = results["idle (echo engine)"]
    print(f"\ncallback lateness with 4 calls, {CALL_S:.0f} s per case; model: {label}; "
          f"clock thread made {got[0].policy if got else 'nothing'}")
    print(f"{'case':30s} {'late p50':>9s} {'p99':>8s} {'max':>8s} {'gap max':>8s} {'p99 vs idle':>12s}")
    for name, r in results.items():
        print(f"{name:30s} {r['late_p50_ms']:7.2f}ms {r['late_p99_ms']:6.2f}ms {r['late_max_ms']:6.2f}ms "
              f"{r['interval_max_ms']:6.2f}ms {r['late_p99_ms'] / max(idle['late_p99_ms'], 1e-3):11.1f}x")


# ---- 3. the echo line's round trip over a real SIP call, and its parts ----------------------------

PEER = os.path.join(os.path.dirname(__file__), "..", "tests", "media_peer.py")
CLICK_EVERY_S = 0.5
BURST = RATE * 30 // 1000  # samples


def click_train(seconds: float) -> np.ndarray:
    x = np.zeros(int(RATE * seconds), np.int16)
    period = int(RATE * CLICK_EVERY_S)
    for start in range(period, len(x) - period, period):
        # a 30 ms chirp burst (500 -> 3000 Hz, Hann window): in G.711's band and G.722's alike, long
        # enough that voice activity detection lets it through, sharp enough to time to a sample
        t = np.arange(BURST) / RATE
        burst = np.sin(2 * np.pi * (500 * t + 2500 * t * t / (2 * BURST / RATE))) * np.hanning(BURST)
        x[start : start + BURST] = (12000 * burst).astype(np.int16)
    return x


def click_lags(sent: np.ndarray, heard: np.ndarray, rate: int) -> np.ndarray:
    """Delay of each click of `sent` (at RATE) in `heard` (at `rate`), in ms: the correlation peak
    within the half period after the click."""
    step = RATE // rate
    s = sent[::step].astype(np.float64)
    h = heard.astype(np.float64)
    period = int(rate * CLICK_EVERY_S)
    width = BURST // step
    lags = []
    for start in range(period, len(s) - period, period):
        ref = s[start : start + width]
        seg = h[start : start + period]
        if len(seg) < period:
            break
        c = np.correlate(seg, ref, "valid")
        if c.max() > 0.3 * np.dot(ref, ref):
            lags.append(np.argmax(c) * 1000.0 / rate)
    return np.array(lags)


@pytest.mark.parametrize("codec", ["G722", "PCMU"])
def test_echo_line_round_trip(benchmark, codec, tmp_path):
    """Click sent by a pjsua2 peer process -> click heard back; the part spent inside our endpoint
    (port to port, from our own recording) and the resamplers' share of it."""
    import subprocess
    import wave

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from callbot.sip.config import EndpointConfig, TransportConfig
    from callbot.sip.endpoint import Endpoint
    from callbot.sip.events import CallEnded
    from callbot.app.recording import Recorder, read_recording

    seconds = 20.0 if FULL else 6.0
    sent = click_train(seconds)
    play, record = tmp_path / "clicks.wav", tmp_path / "heard.wav"
    with wave.open(str(play), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE), w.writeframes(sent.tobytes())
    engine = EchoEngine()
    recorder = Recorder(tmp_path)
    ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),)),
                  sessions=CallRouter(engine), recorder=recorder).start()
    result = {}

    def run():
        peer = subprocess.run([sys.executable, PEER, "--uri", ep.account_uri(), "--codec", codec, "--play", str(play),
                               "--record", str(record), "--seconds", str(seconds + 0.5)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 60)
        assert peer.returncode == 0, peer.stderr[-2000:]
        import json

        for line in peer.stdout.splitlines():
            ev = json.loads(line)
            if ev["ev"] == "jitter_buffer":
                result["peer_jitter_buffer"] = ev
        ep.wait_for(CallEnded, timeout=15)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        ep.stop()
        engine.close()
        recorder.close()
    with wave.open(str(record)) as r:
        heard = np.frombuffer(r.readframes(r.getnframes()), "<i2")
    [wav] = list(tmp_path.glob("2*.wav"))
    rate, rec = read_recording(wav)
    rt = click_lags(sent, heard, RATE)
    # our recording: where each click sits on the caller's side, and the echo on the bot's side
    caller = click_lags(sent, rec[:, 0], rate)
    bot = click_lags(sent, rec[:, 1], rate)
    n = min(len(caller), len(bot))
    inside = bot[:n] - caller[:n]
    resamplers = 1000.0 * (3.5 if rate == 8000 else 2.0) / 1000.0  # CallAudio.delay_ms at that rate
    result.update({
        "clicks": int(len(rt)),
        "round_trip_ms_p50": float(np.median(rt)), "round_trip_ms_max": float(rt.max()),
        "inside_endpoint_ms_p50": float(np.median(inside)), "port_rate": rate,
        "resamplers_ms": resamplers,
    })
    jb = result.get("peer_jitter_buffer", {})
    benchmark.extra_info.update(result)
    print(f"\n{codec}: {len(rt)} clicks, round trip p50 {result['round_trip_ms_p50']:.1f} ms (max {result['round_trip_ms_max']:.1f}); "
          f"inside our endpoint (port in -> port out, echo engine) p50 {result['inside_endpoint_ms_p50']:.1f} ms "
          f"= one bridge tick 20 ms + our resamplers {resamplers:.1f} ms; port at {rate} Hz; "
          f"the peer's jitter buffer averaged {jb.get('avg_delay_ms')} ms (min {jb.get('min_delay_ms')}, max {jb.get('max_delay_ms')}); "
          f"the rest ({result['round_trip_ms_p50'] - result['inside_endpoint_ms_p50']:.1f} ms) is packetization, "
          f"both jitter buffers, pjmedia resampling and the peer's bridge")


# ---- 4. what pjmedia's conference bridge adds when a port's rate differs from the bridge's ---------

BRIDGE_CASES = [  # (bridge rate, source port rate, sink port rate, MediaConfig.quality)
    (16000, 16000, 16000, 8),
    (16000, 8000, 16000, 8),
    (16000, 8000, 8000, 8),
    (16000, 8000, 16000, 3),
    (24000, 16000, 24000, 8),
    (24000, 8000, 24000, 8),
]


class _Source(pj.AudioMediaPort):
    """Plays `signal` once at `rate`, 20 ms a frame."""

    def __init__(self, rate, signal):
        super().__init__()
        self.n, self.signal, self.k = rate // 50, signal, 0
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
        self.createPort(f"src{rate}", fmt)

    def onFrameRequested(self, frame):
        chunk = self.signal[self.k * self.n : (self.k + 1) * self.n]
        data = chunk.tobytes() + bytes(2 * (self.n - len(chunk)))
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = pj.ByteVector(data)
        frame.size = len(data)
        self.k += 1

    def onFrameReceived(self, frame):
        pass


class _Sink(pj.AudioMediaPort):
    def __init__(self, rate):
        super().__init__()
        self.heard = []
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
        self.createPort(f"sink{rate}", fmt)

    def onFrameRequested(self, frame):
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = pj.ByteVector(bytes(frame.size))

    def onFrameReceived(self, frame):
        self.heard.append(bytes(frame.buf))


def bridge_case(bridge: int, src_rate: int, sink_rate: int, quality: int) -> dict:
    """Impulse delay and tone levels from a port at src_rate to one at sink_rate through the bridge."""
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = cfg.logConfig.consoleLevel = 0
    cfg.uaConfig.threadCnt = 0
    cfg.medConfig.clockRate = cfg.medConfig.sndClockRate = bridge
    cfg.medConfig.quality = quality
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    ep.libStart()
    n = src_rate // 50
    freqs = [1000, 3000, 3400] if min(src_rate, sink_rate) == 8000 else [1000, 6000, 7000]
    seg = 25  # frames per tone
    t = np.arange(seg * n) / src_rate
    impulse = np.zeros(50 * n, np.int16)
    impulse[25 * n] = 20000
    signal = np.concatenate([impulse] + [(8000 * np.sin(2 * np.pi * f * t)).astype(np.int16) for f in freqs])
    src, sink = _Source(src_rate, signal), _Sink(sink_rate)
    src.startTransmit(sink)
    frames = len(signal) // n
    while src.k < frames + 5:
        time.sleep(0.05)
    src.stopTransmit(sink)
    y = np.frombuffer(b"".join(sink.heard), np.int16).astype(np.float64)
    m = sink_rate // 50
    delay_ms = (np.argmax(np.abs(y[: 50 * m])) - 25 * m) * 1000.0 / sink_rate
    ref = 20 * np.log10(8000 / np.sqrt(2))
    levels = {}
    for i, f in enumerate(freqs):
        part = y[(50 + i * seg + 5) * m : (50 + i * seg + 20) * m]
        levels[f] = float(20 * np.log10(np.sqrt(np.mean(part**2)) + 1e-9) - ref)
    del src, sink
    gc.collect()
    ep.libDestroy()
    del ep
    return {"delay_ms": float(delay_ms), "levels_db": levels}


def test_bridge_resampling(benchmark):
    """Why our port runs at the bridge's rate: the delay and band edge pjmedia's resampling costs."""
    results = {}

    def run():
        for case in BRIDGE_CASES:
            results[case] = bridge_case(*case)

    benchmark.pedantic(run, rounds=1, iterations=1)
    print("\nbridge  port in -> port out  quality  added delay  tone levels")
    for (bridge, a, b, q), r in results.items():
        levels = "  ".join(f"{f} Hz {db:+.1f} dB" for f, db in r["levels_db"].items())
        print(f"{bridge:6d}  {a:6d} -> {b:6d}      {q:4d}  {r['delay_ms']:8.2f} ms  {levels}")
    benchmark.extra_info.update({f"{k[0]}:{k[1]}->{k[2]}:q{k[3]}": v for k, v in results.items()})
