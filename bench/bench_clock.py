"""PeriodicClock vs relative time.sleep: wake lateness and drift over many 20 ms and 80 ms periods,
idle and with a busy process competing for the cores.

Why: the inference thread's watchdog must wake every 80 ms for the whole call. This measures, in one
run on the same machine and load, how late each wake is and how far the cadence has drifted after N
periods, for three loops:
  sleep     the usual relative loop: time.sleep(period - elapsed since the last wake)
  clock     PeriodicClock.wait(): absolute deadlines start + k * period
  clock_rt  the same after make_realtime() (SCHED_FIFO when permitted, else nice + no timer slack)
Lateness is wake time minus the time that loop aimed at (its own target); drift is the last wake
minus the grid point it belongs to (start + N * period; for the clock start + (N + missed) * period,
where missed counts grid points its no-burst policy dropped after a wake later than a whole period;
the sleep loop never drops one, it shifts instead). Each loop runs in its own thread, so
make_realtime never touches pytest's.

Run (about 3 minutes: 1000 periods of 20 ms and, by default, 100 of 80 ms, each for 3 loops x 2 loads):

    python -m pytest bench/bench_clock.py -p no:cacheprovider --benchmark-columns=rounds

CALLBOT_BENCH_CLOCK_PERIODS_80=1000 runs the full 1000 periods of 80 ms too (about 9 minutes more);
CALLBOT_BENCH_CLOCK_BUSY=N sets how many busy processes the "busy" load starts (default 1: one of
this machine's two cores). The table printed at the end is what BENCHMARKS.md quotes.
"""
import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from callbot.engine import PeriodicClock, make_realtime

PERIODS = {20: int(os.environ.get("CALLBOT_BENCH_CLOCK_PERIODS_20", "1000")),
           80: int(os.environ.get("CALLBOT_BENCH_CLOCK_PERIODS_80", "100"))}
BUSY_PROCS = int(os.environ.get("CALLBOT_BENCH_CLOCK_BUSY", "1"))
LOOPS = ("sleep", "clock", "clock_rt")

RESULTS: dict[tuple[int, str, str], dict] = {}  # (period ms, load, loop) -> metrics


def relative_sleep_loop(period_ms: float, n: int) -> tuple[list[int], int, int]:
    period_ns = round(period_ms * 1e6)
    start = last = time.monotonic_ns()
    late = []
    for _ in range(n):
        time.sleep(max(0.0, (period_ns - (time.monotonic_ns() - last)) / 1e9))
        woke = time.monotonic_ns()
        late.append(woke - (last + period_ns))
        last = woke
    return late, last - (start + n * period_ns), 0


def clock_loop(period_ms: float, n: int) -> tuple[list[int], int, int]:
    clock = PeriodicClock(period_ms)
    late = [clock.wait() for _ in range(n)]
    # The last wake served the grid point start + (n + missed) * period: its lateness is the drift.
    return late, late[-1], clock.missed


def steal_ms() -> float | None:
    """CPU time the hypervisor took from this VM, all cores (Linux /proc/stat), or None. In a VM a
    wake can be late because the host ran something else: this tells those tails apart."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_in_thread(loop: str, period_ms: float, n: int) -> dict:
    out = {}

    def body():
        rt = make_realtime(period_ms, period_ms / 2, period_ms) if loop == "clock_rt" else None
        try:
            fn = relative_sleep_loop if loop == "sleep" else clock_loop
            out["late"], out["drift"], out["missed"] = fn(period_ms, n)
        finally:
            if rt is not None:
                out["policy"] = rt.policy
                rt.restore()

    t = threading.Thread(target=body, name=f"bench-{loop}")
    t.start()
    t.join()
    if "late" not in out:
        raise RuntimeError(f"{loop} loop failed")
    return out


def quantile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@pytest.fixture(scope="module", params=["idle", "busy"])
def load(request):
    procs = []
    if request.param == "busy":
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_PROCS)]
        time.sleep(0.5)  # let them reach full speed before measuring
    try:
        yield request.param
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("period_ms", sorted(PERIODS))
def test_wake_lateness(benchmark, load, period_ms, loop):
    n = PERIODS[period_ms]
    benchmark.group = f"clock-{period_ms}ms-{load}"
    runs = []
    steal_before = steal_ms()
    benchmark.pedantic(lambda: runs.append(run_in_thread(loop, period_ms, n)), rounds=1, iterations=1)
    steal_after = steal_ms()
    out = runs[0]
    late = sorted(out["late"])
    metrics = {
        "periods": n,
        "p50_us": quantile(late, 0.50) / 1e3,
        "p99_us": quantile(late, 0.99) / 1e3,
        "max_us": late[-1] / 1e3,
        "mean_us": statistics.fmean(late) / 1e3,
        "drift_ms": out["drift"] / 1e6,
        "missed": out["missed"],
        "policy": out.get("policy", "SCHED_OTHER (default)"),
        "loadavg_1min": os.getloadavg()[0],
        "steal_ms": None if steal_before is None else steal_after - steal_before,
    }
    RESULTS[(period_ms, load, loop)] = metrics
    benchmark.extra_info.update(metrics)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Print the table once every case has run (capture suspended, so it shows without -s)."""
    yield
    if not RESULTS:
        return
    lines = [
        f"clock bench, {sys.platform}, {os.cpu_count()} cores, busy load = {BUSY_PROCS} spinning process(es)",
        ("| period | load | loop | periods | p50 us | p99 us | max us | drift after N | missed | policy "
         "| loadavg | VM steal |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(RESULTS, key=lambda k: (k[0], k[1], LOOPS.index(k[2])))
    for key in order:
        period_ms, load, loop = key
        m = RESULTS[key]
        lines.append(f"| {period_ms} ms | {load} | {loop} | {m['periods']} | {m['p50_us']:.0f} | "
                     f"{m['p99_us']:.0f} | {m['max_us']:.0f} | {m['drift_ms']:+.2f} ms | {m['missed']} | "
                     f"{m['policy']} | {m['loadavg_1min']:.1f} | {m['steal_ms'] or 0:.0f} ms |")
    for key in order:
        period_ms, load, loop = key
        base, m = RESULTS.get((period_ms, load, "sleep")), RESULTS[key]
        if loop == "clock" and base:
            lines.append(f"{period_ms} ms {load}: drift after {m['periods']} periods "
                         f"sleep {base['drift_ms']:+.2f} ms "
                         f"vs clock {m['drift_ms']:+.3f} ms; lateness sleep/clock "
                         f"p50 {base['p50_us'] / m['p50_us']:.2f}, p99 {base['p99_us'] / m['p99_us']:.2f}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
