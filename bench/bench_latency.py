"""Mouth-to-ear on loopback: a real SIP phone (bench/peer_audio.py, its own pjsua2 process) speaks clicks
into callbot's Endpoint and times them back, per codec, against two baselines measured in the same run.

Why: the budget (docs/latency.md, "Latency budget") says our own additions (everything but ptime,
jitter buffers and the model)
must stay <= 5 ms p99. Stages are only believable end to end, with a real peer's clock and jitter
buffer on the far side. Cases (BENCHMARKS.md, "## Latency (mouth-to-ear)"):

- `loop`:  pjsip's own echo, the call's conference port transmitting to itself: codec, ptime and both
           jitter buffers, nothing of ours. It runs BESIDE our port on the same call, so the peer hears
           every click twice, first through pjsip alone, then through us: the difference, click by click,
           is what we add, free of the jitter buffers' drift (they grow and shrink in 20 ms steps with
           the machine's load; calls measured one after the other differ by 40 ms for that alone).
- `echo`:  the product's echo line: media port (ext/_pcm.pyx), rings, CallAudio's resamplers and the
           EchoEngine's 2 ms poll. A tap on the session's CallAudio times each click on the engine side,
           splitting the round trip into inbound (peer -> engine) and outbound (engine -> peer).
- `ws`:    the path this product replaces, Twilio Media Streams' shape: JSON messages with base64 mu-law
           8 kHz, 20 ms each, over a WebSocket on loopback served with uvloop, into the same EchoEngine.
- `model`: the tiny model (same code as the 7B) behind the ModelEngine runner (KINDS: in a child
           process as serve runs it, the same with its inference thread pinned to a CPU (`[model]
           cpus`, engine/audio/cpu_affinity.py), in a thread, the runner before its rounds met the tick, and
           "steady": each step padded to a fixed length, the schedule without this CPU's spread). Its
           audio is replaced, after each real step, by a marker click at the first sample of the output
           frame computed from the input frame holding the peer's click: the first output that could
           depend on it. Stages come from the runner's FrameStats (ready, step start, step end,
           pushed); "own" there is the marker's time minus the loop's, the frame fill (click to frame
           end) and the step, plus the 20 ms of packetization that the loop's copy carries and the
           marker's carries inside the fill.

Run (about 3.5 min):
    python -m pytest bench/bench_latency.py -p no:cacheprovider -q -s
    CALLBOT_BENCH_CLICKS=300 CALLBOT_BENCH_MODEL_CLICKS=100 ...   more clicks (default 80 echo, 40 model)
    CALLBOT_BENCH_MODEL=/path/to/personaplex-7b-v1 CALLBOT_BENCH_QUANT=q4 ...   the real weights (Mac)
"""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import msgspec
import numpy as np
import pytest

import latency_lab as L
from callbot.engine.serving.step_delay import SteadyModel

CLICKS = int(L.env_float("CALLBOT_BENCH_CLICKS", 80))
ECHO_INTERVAL_MS = 217.0  # not a multiple of 20 ms: clicks land at every phase of a frame
MODEL_CLICKS = int(L.env_float("CALLBOT_BENCH_MODEL_CLICKS", 40))
# not a multiple of 80 ms (clicks land at every phase of a model frame), and longer than the slowest
# marker seen under load (460 ms), so that no marker lands in the next click's window
MODEL_INTERVAL_MS = 610.0
CODECS = ("PCMU", "G722")
KINDS = ("process", "pinned", "thread", "baseline", "steady")  # the model's hostings measured (the docstring)
PTIME_MS = 20.0
# the "steady" case's step: longer than the tiny model's slowest here (p99 21-34 ms on the loaded CI
# machine), so that the pad, not the CPU, sets its length
STEADY_STEP_MS = L.env_float("CALLBOT_BENCH_STEADY_STEP_MS", 36.0)
# the "pinned" case's CPU: the last this process may use, the inference thread's alone (the SIP side, the
# peer and the rest of the inference process run on the others), as on a machine that gives the model its
# own core
PINNED_CPU = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
RESULTS: dict[tuple[str, str], dict] = {}

pytestmark = pytest.mark.timeout(900)


def _loadavg() -> float:
    return os.getloadavg()[0]  # Linux and macOS


def _record(benchmark, key, row):
    row["loadavg"] = _loadavg()
    RESULTS[key] = row
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})


def _match(sent_ns: np.ndarray, times_ns: np.ndarray, window_ns: float) -> np.ndarray:
    """For each sent time, the index of the first time in [sent, sent + window), or -1."""
    out = np.full(len(sent_ns), -1)
    for i, s in enumerate(sent_ns):
        j = np.flatnonzero((times_ns >= s) & (times_ns < s + window_ns))
        if len(j):
            out[i] = j[0]
    return out


def _sent_ns(peer) -> np.ndarray:
    rate, n = int(peer["rate"]), int(peer["frame"])
    return np.array([peer["t_req"][s // n] + (s % n) * 1e9 / rate for s in peer["sent"]])


def run_once(benchmark, fn):
    """pytest-benchmark records the whole call as one round (the numbers inside are per click)."""
    return benchmark.pedantic(fn, rounds=1, iterations=1)


@pytest.mark.parametrize("codec", CODECS)
def test_echo(benchmark, codec):
    from callbot.engine.serving.echo import EchoEngine

    taps = L.ClickTaps()
    engine = L.tap_engine(EchoEngine(), taps)
    try:
        peer, stats = run_once(benchmark, lambda: L.sip_call_with_clicks(engine, codec, CLICKS, ECHO_INTERVAL_MS,
                                                                         loop="beside"))
    finally:
        engine.close()
    arrivals = L.click_arrivals(peer, ECHO_INTERVAL_MS, 2)
    loop, ours = arrivals[:, 0], arrivals[:, 1]
    sent = _sent_ns(peer)
    seen = np.array(taps.seen, np.float64).reshape(-1, 4)
    idx = _match(sent, seen[:, 1], ECHO_INTERVAL_MS * 1e6)
    good = np.isfinite(ours) & (idx >= 0)
    inbound = (seen[idx[good], 1] - sent[good]) / 1e6
    engine_ms = (seen[idx[good], 3] - seen[idx[good], 1]) / 1e6
    outbound = ours[good] - inbound - engine_ms
    own = ours[good] - loop[good]
    _record(benchmark, ("echo", codec), {
        "loop_min": float(np.min(loop[good])), "tx_settled": stats.get("tx_settled") if stats else None,
        "loop": L.stats_ms(loop[good]), "total": L.stats_ms(ours[good]), "lost": int((~good).sum()),
        "inbound": L.stats_ms(inbound), "engine": L.stats_ms(engine_ms), "outbound": L.stats_ms(outbound),
        "own": L.stats_ms(own), "own_first": L.stats_ms(own[: max(1, len(own) // 4)]),
        "resampler_ms": stats["resampler_ms"] if stats else float("nan"),
        "port_rate": stats["port_rate"] if stats else 0, "media": stats["media"] if stats else {},
        "jb_peer_avg_ms": float(peer["jbuf"][2]), "jb_ours_avg_ms": stats["jb_avg_ms"] if stats else float("nan")})
    assert good.sum() >= CLICKS // 2, (arrivals, len(taps.seen))


def test_ws_baseline(benchmark):
    from callbot.engine.serving.echo import EchoEngine

    engine = EchoEngine()
    try:
        peer = run_once(benchmark, lambda: L.ws_call_with_clicks(engine, CLICKS, ECHO_INTERVAL_MS))
    finally:
        engine.close()
    lat = L.click_latencies(peer, ECHO_INTERVAL_MS)
    ok = lat[np.isfinite(lat)]
    _record(benchmark, ("ws", "PCMU"), {"total": L.stats_ms(ok), "lost": int(np.isnan(lat).sum())})
    assert len(ok) >= CLICKS // 2, lat


# ---- the model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_source(tmp_path_factory):
    """(weights folder, load keywords, label): the tiny model in the HF layout, or CALLBOT_BENCH_MODEL."""
    return L.bench_model_source(tmp_path_factory.mktemp("tiny-personaplex"))


def model_call(source, codec: str, clicks: int, interval_ms: float, kind: str, tmp_path):
    """One SIP call to the model, served as `serve` serves it (kind "process": the InferenceProcess, the
    model in a spawned child) or by a ModelEngine in this process ("thread", the layout before the
    split). Returns (peer result, marks, the closed session: final_summary and stats, endpoint stats)."""
    # "pinned": the model's core of its own, the rest (this process, the peer, the child) off it
    with _off_cpu(PINNED_CPU) if kind == "pinned" else contextlib.nullcontext():
        return _model_call(source, codec, clicks, interval_ms, kind, tmp_path)


@contextlib.contextmanager
def _off_cpu(cpu: int):
    """This thread, and the threads and processes it starts meanwhile (they inherit its mask), kept off
    `cpu`; only a thread that pins itself there (the inference thread, `[model] cpus`) runs on it."""
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, mask - {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)


def _model_call(source, codec: str, clicks: int, interval_ms: float, kind: str, tmp_path):
    from callbot.engine.serving.inference_process import InferenceProcess

    directory, how, _ = source
    closed = []
    if kind in ("process", "pinned"):
        marks_path = tmp_path / "marks.txt"
        engine = InferenceProcess(functools.partial(L.model_setup, directory, how, str(marks_path)),
                                  on_closed=closed.append, cpus=[PINNED_CPU] if kind == "pinned" else None)
        if kind == "pinned" and engine.info.cpus != [PINNED_CPU]:
            engine.close()
            pytest.skip(f"the inference thread could not be pinned to CPU {PINNED_CPU} here")
    else:
        from callbot.engine.serving.runner import BotPrompt, ModelEngine

        loaded = L._load(directory, how)
        # "steady": every step padded to STEADY_STEP_MS, as steady as a dedicated accelerator's
        # (engine/serving/step_delay.py): the schedule's own wait for the tick, without this CPU's spread
        model = L.MarkedModel(SteadyModel(loaded, STEADY_STEP_MS / 1e3) if kind == "steady" else loaded)
        snapshot = L._prepare(model)
        L._warm_up(loaded, snapshot)
        # "baseline": the runner as it was before its rounds met the tick (issue 13, point 5): every due
        # frame stepped at once, linear-phase resamplers
        before = {"align": False, "resampler_phase": "linear"} if kind == "baseline" else {}
        engine = ModelEngine(model, lambda ci: BotPrompt(snapshot, seed=1), on_closed=closed.append, **before)
    try:
        peer, stats = L.sip_call_with_clicks(engine, codec, clicks, interval_ms, loop="beside")
    finally:
        engine.close()
    if engine.error is not None:
        raise engine.error
    marks = L.read_marks(marks_path) if kind in ("process", "pinned") else model.marks
    return peer, marks, closed[0] if closed else None, stats


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", CODECS)
def test_model(benchmark, model_source, codec, kind, tmp_path):
    label = model_source[2]
    peer, marks, s, stats = run_once(benchmark, lambda: model_call(model_source, codec, MODEL_CLICKS,
                                                                     MODEL_INTERVAL_MS, kind, tmp_path))
    summary = msgspec.to_builtins(s.final_summary)
    arrivals = L.click_arrivals(peer, MODEL_INTERVAL_MS, 2)
    loop, lat = arrivals[:, 0], arrivals[:, 1]
    sent = _sent_ns(peer)
    from callbot.engine.serving.runner import STAGES

    t = s.stats.held()[0]
    ready = np.array([t[k, STAGES.index("resampled")] for k, _ in marks], np.float64)
    idx = _match(sent, ready, MODEL_INTERVAL_MS * 1e6)
    good = np.isfinite(lat) & (idx >= 0)
    rows = [marks[i] for i in idx[good]]
    fill = np.array([(1920 - p) / 24.0 for _, p in rows])  # ms from the click to its frame's end
    st = np.array([t[k] for k, _ in rows], np.float64)
    col = {name: st[:, STAGES.index(name)] for name in STAGES}
    # when the phone handed over the packet holding the frame's last sample, and when it got back the one
    # holding the marker's first (the same convention as `lat`: its offset in that packet included)
    rate, n = int(peer["rate"]), int(peer["frame"])
    clicks = np.asarray(peer["sent"])[good].astype(np.int64)
    last = clicks + np.array([round((1920 - p) * rate / 24000) for _, p in rows]) - 1
    sent_end = np.asarray(peer["t_req"], np.float64)[np.minimum(last // n, len(peer["t_req"]) - 1)]
    heard = sent[good] + lat[good] * 1e6

    def ms(a, b):
        return (b - a) / 1e6

    # the bridge's rate <-> 24 kHz (every call's port runs at it), in the phase the call's CallAudio used
    resamplers = _resamplers_ms(16000, "linear" if kind == "baseline" else "minimum")
    # the schedule's hold: how long a frame was kept after it was resampled so that its round ends just
    # before the tick its audio leaves on (the tick's wait, moved before the step): resampled -> released
    holds = ms(col["resampled"], col["released"])
    ours = (ms(col["ring_in"], col["resampled"]) + ms(col["released"], col["step_start"])
            + ms(col["decoded"], col["ring_out"]) + resamplers)
    tick_wait = holds + ms(col["ring_out"], col["rtp_out"])
    # the same on the audio's path: a frame found and resampled before its round's planned start was
    # found inside the wait for the tick (the start depends on the tick grid, not on when the frame was
    # found), so finding it sooner would not have moved its audio; only a frame found after its planned
    # start (hold 0) waited for us
    inside_hold = np.where(holds > 0, ms(col["ring_in"], col["resampled"]), 0.0)
    on_path = ours - inside_hold
    step = ms(col["step_start"], col["decoded"])
    # rtp_out is unknown (0) for a frame whose first samples were cut from tx (tx_settled): left out
    out = col["rtp_out"] > 0
    _record(benchmark, ("model", codec, kind), {
        "label": label, "total": L.stats_ms(lat[good]), "lost": int((~good).sum()),
        "fill": L.stats_ms(fill), "arrival_to_out": L.stats_ms(lat[good] - fill),
        "phone_to_ring_in": L.stats_ms(ms(sent_end, col["ring_in"])),
        "ring_in_to_resampled": L.stats_ms(ms(col["ring_in"], col["resampled"])),
        "resampled_to_start": L.stats_ms(ms(col["resampled"], col["step_start"])), "step": L.stats_ms(step),
        "mimi_encode": L.stats_ms(ms(col["step_start"], col["encoded"])),
        "lm_step": L.stats_ms(ms(col["encoded"], col["lm_stepped"])),
        "mimi_decode": L.stats_ms(ms(col["lm_stepped"], col["decoded"])),
        "decoded_to_ring_out": L.stats_ms(ms(col["decoded"], col["ring_out"])),
        "ring_out_to_rtp_out": L.stats_ms(ms(col["ring_out"], col["rtp_out"])[out]),
        "hold": L.stats_ms(holds), "tick_wait": L.stats_ms(tick_wait[out]),
        "rtp_out_to_phone": L.stats_ms(ms(col["rtp_out"], heard)[out]),
        "own_stages": L.stats_ms(ours), "own_stages_and_tick": L.stats_ms((ours + tick_wait)[out]),
        "own_on_path": L.stats_ms(on_path),
        "resamplers_ms": resamplers,
        # the loop's copy carries the peer's packetization (20 ms: a sample waits for its packet's end);
        # the marker's carries it inside `fill` (the frame's last packet leaves as the frame ends)
        "loop": L.stats_ms(loop[good]), "own": L.stats_ms(lat[good] - loop[good] - fill - step + PTIME_MS),
        "beyond_step_ms": lat[good] - fill - step, "loop_min": float(np.min(loop[good])),
        "own_ms": lat[good] - loop[good] - fill - step + PTIME_MS,
        "steps": summary["steps"], "steps_late": summary["steps_late"],
        "underruns": summary["underruns"], "overruns": summary["overruns"],
        "silence_fed": summary["silence_fed"], "frames_dropped": summary["frames_dropped"],
        "tx_settled": summary["tx_settled"]})
    assert good.sum() >= MODEL_CLICKS // 2, (lat, marks)


def _resamplers_ms(call_rate: int, phase: str = "linear") -> float:
    """The delay CallAudio's two resamplers add (filter delay: in the audio, not in any timestamp; for
    minimum phase its largest in the band)."""
    from callbot.engine import Resampler

    return float(Resampler(call_rate, 24000, phase).delay_ms + Resampler(24000, call_rate, phase).delay_ms)


# ---- the report -------------------------------------------------------------------------------------


def _fmt(st):
    return f"{st['p50']:7.1f} {st['p99']:7.1f}"


def _ratio(new, old, key):
    return (f"{new[key]['p50']:.1f}/{old[key]['p50']:.1f} = {new[key]['p50'] / old[key]['p50']:.2f}x, "
            f"{new[key]['p99']:.1f}/{old[key]['p99']:.1f} = {new[key]['p99'] / old[key]['p99']:.2f}x")


def _pairs(kind: str, against: str):
    """(codec, the model case `kind`, the case `against`) for each codec both ran for."""
    for codec in CODECS:
        a, b = RESULTS.get(("model", codec, kind)), RESULTS.get(("model", codec, against))
        if a and b:
            yield codec, a, b


def _spread(r) -> str:
    """A case's step spread, p99 - p50, ms."""
    return f"{r['step']['p99'] - r['step']['p50']:.1f}"


def test_report(capsys):
    if not RESULTS:
        pytest.skip("run the whole file")
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=L.ROOT).stdout.strip()
    lines = [f"clicks per case: {CLICKS}; tree {rev}; ms, p50 / p99 over clicks", "",
             "case  codec  pjsip loop     ours (total)    own = ours-loop  inbound         "
             "engine        outbound        lost  tx underruns  tx settled"]
    for codec in CODECS:
        r = RESULTS.get(("echo", codec))
        if r:
            lines.append(f"echo  {codec:<5} {_fmt(r['loop'])}  {_fmt(r['total'])}  {_fmt(r['own'])}  "
                         f"{_fmt(r['inbound'])} {_fmt(r['engine'])} "
                         f"{_fmt(r['outbound'])} {r['lost']:>4}  "
                         f"{r['media'].get('tx_underruns', '?'):>12}  {r['tx_settled']!s:>10}   load {r['loadavg']:.1f}")
    ws = RESULTS.get(("ws", "PCMU"))
    if ws:
        lines.append(f"ws    PCMU   {'':15}  {_fmt(ws['total'])}  {'':15}  {'':15} {'':15} {'':15} "
                     f"{ws['lost']:>4}         load {ws['loadavg']:.1f}")
    ec = RESULTS.get(("echo", "PCMU"))
    if ws and ec:
        lines += ["", "echo PCMU over SIP / the WebSocket baseline: total p50 "
                  f"{ec['total']['p50'] / ws['total']['p50']:.2f}x p99 {ec['total']['p99'] / ws['total']['p99']:.2f}x; "
                  f"own (beyond pjsip's transport) p50 {ec['own']['p50'] / ws['total']['p50']:.2f}x "
                  f"p99 {ec['own']['p99'] / ws['total']['p99']:.2f}x"]
    for codec in CODECS:
        r = RESULTS.get(("echo", codec))
        if r:
            lines.append(f"echo {codec}: CallAudio resamplers {r['resampler_ms']:.2f} ms, port at {r['port_rate']} Hz, "
                         f"own over the first quarter of the call p50/p99 {_fmt(r['own_first'])}; media {r['media']}")
    where = {"process": "a child process (as serve runs it)", "thread": "a thread of the SIP process",
             "pinned": f"a child process, its inference thread alone on CPU {PINNED_CPU} ([model] cpus; the rest "
                       "on the other CPUs)",
             "baseline": "a thread, BASELINE: rounds at once, linear-phase resamplers",
             "steady": f"a thread, every step padded to a steady {STEADY_STEP_MS:g} ms"}
    for codec, kind in ((c, k) for k in KINDS for c in CODECS):
        m = RESULTS.get(("model", codec, kind))
        if not m:
            continue
        lines += ["", f"model {m['label']}, {codec}, inference in {where[kind]}: clicks {m['total']['n']}, lost {m['lost']}, steps {m['steps']}, "
                  f"late {m['steps_late']}, underruns {m['underruns']}, overruns {m['overruns']}, "
                  f"silence fed {m['silence_fed']}, dropped {m['frames_dropped']}, tx settled {m['tx_settled']}; "
                  f"load {m['loadavg']:.1f}"]
        for name in ("loop", "total", "fill", "arrival_to_out", "phone_to_ring_in", "ring_in_to_resampled",
                     "resampled_to_start", "step", "mimi_encode", "lm_step", "mimi_decode", "decoded_to_ring_out",
                     "ring_out_to_rtp_out", "rtp_out_to_phone", "hold", "tick_wait", "own_stages",
                     "own_on_path", "own_stages_and_tick", "own"):
            lines.append(f"  {name:<20}{_fmt(m[name])}")
        lines.append(f"  resamplers (in own_stages) {m['resamplers_ms']:.2f} ms")
    # the same run: the schedule and minimum phase against the runner before them
    for codec, new, old in _pairs("thread", "baseline"):
        lines.append(f"model {codec}, thread / baseline (p50, p99): wait for the tick after the push "
                     f"{_ratio(new, old, 'ring_out_to_rtp_out')}; own stages beyond the tick "
                     f"{_ratio(new, old, 'own_stages')} (on the audio's path {_ratio(new, old, 'own_on_path')}); "
                     f"total {_ratio(new, old, 'total')}")
    # the schedule with a steady step, against the loaded CPU's own step
    for codec, steady, new in _pairs("steady", "thread"):
        lines.append(f"model {codec}, steady / thread (p50, p99): wait for the tick after the push "
                     f"{_ratio(steady, new, 'ring_out_to_rtp_out')}; own stages beyond the tick "
                     f"{_fmt(steady['own_stages'])}, on the audio's path {_fmt(steady['own_on_path'])}; "
                     f"step spread (p99 - p50) {_spread(steady)} / {_spread(new)} ms")
    # the inference thread on a core of its own, against the same hosting free to move
    for codec, pinned, free in _pairs("pinned", "process"):
        lines.append(f"model {codec}, pinned / process (p50, p99): step {_ratio(pinned, free, 'step')}; wait for "
                     f"the tick after the push {_ratio(pinned, free, 'ring_out_to_rtp_out')}; step spread "
                     f"(p99 - p50) {_spread(pinned)} / {_spread(free)} ms")
    lines += projection_lines()
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---- the 7B on an M4: a projection ------------------------------------------------------------------

BANDWIDTH_GBS = {"M4": 120.0, "M4 Pro": 273.0}  # unified memory bandwidth, Apple's published figures
ASSUMED_EFFICIENCY = 0.6  # share of peak bandwidth a decode step reaches (an assumption, not measured)
MIMI_PARAMS = 96.2e6  # full Mimi (docs/testing.md, "References": Kyutai's get_mimi builds 96.2 M parameters)


def projection_lines() -> list[str]:
    """The 7B step and mouth-to-ear on an M4, PROJECTED: bytes read per frame (bench/bench_lm.py's count
    from the shapes: temporal + text head + 8 depformer slices + the KV cache, plus Mimi's weights once)
    over the memory bandwidth, at the floor (100 %) and at ASSUMED_EFFICIENCY; the rest of the path
    (everything but the step) is what this run measured with the tiny model."""
    m = next((RESULTS[k] for k in (("model", c, kind) for kind in ("process", "thread") for c in CODECS)
              if k in RESULTS), None)
    if not m or os.environ.get("CALLBOT_BENCH_MODEL"):
        return []
    sys.path.insert(0, str(L.ROOT))
    from bench_lm import _bytes_per_frame

    from callbot.engine.model.lm_config import personaplex_7b

    cfg = personaplex_7b()
    # frame end -> first output heard, minus the step: our own part as measured here (per click) plus
    # the transport at its best in this run (the loop's minimum: jitter buffers at their smallest)
    rest = m["own_ms"] - PTIME_MS + m["loop_min"]
    fill_avg, fill_max = 40.0, 80.0  # a click waits for its frame's end: uniform over 0-80 ms
    lines = ["", "7B on Apple M4: PROJECTION (not a measurement). step = (LM bytes per frame + Mimi bf16 weights) "
             f"/ bandwidth, at 100% (floor) and {ASSUMED_EFFICIENCY:.0%} of it (assumed); Mimi's compute is not",
             "modelled (it may cost more than its weights' read). mouth-to-ear = frame fill (avg 40, worst 80) + "
             f"step + the rest of the path as measured here with the tiny model: our own part per click plus the "
             f"transport at its best (pjsip loop min {m['loop_min']:.1f} ms) = p50 {L.pct(rest, 50):.1f} / "
             f"p99 {L.pct(rest, 99):.1f} ms; {m['label']})",
             "weights  context  chip     GB/frame  step floor  step @60%  fits 80 ms  mouth-to-ear p50  "
             "p99 (worst fill)"]
    for label, bits, group in (("q4g64", 4, 64), ("q8g64", 8, 64), ("bf16", None, 64)):
        for frames in (1, 3000):
            gb = (sum(_bytes_per_frame(cfg, bits, group, frames).values()) + 2 * MIMI_PARAMS) / 1e9
            for chip, bw in BANDWIDTH_GBS.items():
                floor = gb / bw * 1e3
                step = floor / ASSUMED_EFFICIENCY
                lines.append(f"{label:<8} {frames:>7}  {chip:<7} {gb:8.2f} {floor:11.1f} {step:10.1f}  "
                             f"{'yes' if step < 80 else 'NO':>10}  {fill_avg + step + L.pct(rest, 50):16.0f}  "
                             f"{fill_max + step + L.pct(rest, 99):16.0f}")
    return lines
