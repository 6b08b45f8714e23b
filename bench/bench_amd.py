"""Answering-machine detection: verdict time and accuracy on a labelled set of scripted calls (issue 15,
BENCHMARKS.md "Answering-machine detection").

The set (tests/campaign_calls.py labelled_set): 15 answering machines (5 greetings x 3 espeak-ng voices,
150-200 words a minute, 200-500 ms before the greeting, a 800/1000/1400 Hz beep 500 ms after it) and 18
people (6 short answers, "hello?" to "hi, who is this?", x 3 voices, 250-650 ms before speaking, then
silence). Each call is fed in 100 ms chunks, as the recorder hands the callee's leg to the dialer.

- campaigns/amd.py with Asterisk AMD's default parameters (as the campaign file's [amd] defaults);
- the baseline, in the same process on the same frames: the naive rule "a greeting longer than 1.5 s
  is a machine" (the first voiced run, 20 ms frames above the same threshold, gaps under 300 ms joined:
  a machine once it passes 1.5 s, a person when it ends shorter).

Reported: accuracy, the verdict's time after the answer (median, max) per label, the beep's start error,
and the CPU time per second of audio of both (ratio). Asterisk's AMD() itself cannot run here (no
Asterisk on this machine, and its detector is not a library), so the comparison with its defaults is
through our implementation of its rules.

Run (about 5 s; not part of CI):
    .venv/bin/python -m pytest bench/bench_amd.py -p no:cacheprovider -q -s
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from callbot.campaigns.amd import FRAME_MS, AmdDetector
from callbot.campaigns.config import Amd
from tests.campaign_calls import RATE, human, labelled_set, machine

# cases both rules are known to get wrong or slow: a person who answers at length, a machine that waits
HARD = (lambda: human("Hello, this is Maria Gonzalez speaking, who is calling please?"),
        lambda: human("Good afternoon, Smith and Partners, how can I help you?"),
        lambda: machine("Leave a message.", lead_ms=3000),
        lambda: machine("Hi. Message please.", lead_ms=200))

CHUNK = RATE // 10  # 100 ms: the recorder's poll
ROUNDS = 5


class NaiveGreetingRule:
    """A machine when the first voiced stretch passes 1.5 s; a person when it ends before."""

    def __init__(self, rate: int, threshold: int = 256, greeting_ms: float = 1500, gap_ms: float = 300):
        self.frame = rate * FRAME_MS // 1000
        self.threshold, self.greeting_ms, self.gap_ms = threshold, greeting_ms, gap_ms
        self.t_ms = 0.0
        self.start: float | None = None
        self.last_voice = 0.0
        self.verdict: tuple[str, float] | None = None
        self._buf = np.zeros(0, np.int16)

    def feed(self, x: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, x])
        n = len(self._buf) // self.frame
        for i in range(n):
            if self.verdict is None:
                frame = self._buf[i * self.frame:(i + 1) * self.frame]
                voiced = float(np.mean(np.abs(frame.astype(np.int32)))) >= self.threshold
                if voiced:
                    if self.start is None:
                        self.start = self.t_ms
                    self.last_voice = self.t_ms + FRAME_MS
                    if self.last_voice - self.start > self.greeting_ms:
                        self.verdict = ("machine", self.t_ms + FRAME_MS)
                elif self.start is not None and self.t_ms + FRAME_MS - self.last_voice >= self.gap_ms:
                    self.verdict = ("human", self.t_ms + FRAME_MS)
            self.t_ms += FRAME_MS
        self._buf = self._buf[n * self.frame:]


def _run(make, samples: np.ndarray):
    d = make()
    for i in range(0, len(samples), CHUNK):
        d.feed(samples[i:i + CHUNK])
    return d


def test_amd_accuracy_and_verdict_time():
    calls = labelled_set()
    audio_s = sum(len(c.samples) for c in calls) / RATE
    ours = [_run(lambda: AmdDetector(Amd(), RATE, listen_for_beep=True), c.samples) for c in calls]
    naive = [_run(lambda: NaiveGreetingRule(RATE), c.samples) for c in calls]

    def cpu(make) -> float:
        best = float("inf")
        for _ in range(ROUNDS):
            t = time.process_time()
            for c in calls:
                _run(make, c.samples)
            best = min(best, time.process_time() - t)
        return best

    cpu_ours = cpu(lambda: AmdDetector(Amd(), RATE, listen_for_beep=True))
    cpu_naive = cpu(lambda: NaiveGreetingRule(RATE))

    def table(name: str, verdicts: list[tuple[str, float] | None]) -> None:
        right = sum(v is not None and v[0] == c.label for v, c in zip(verdicts, calls))
        print(f"{name}: {right}/{len(calls)} right ({100 * right / len(calls):.0f} %)")
        for label in ("machine", "human"):
            ts = [v[1] for v, c in zip(verdicts, calls) if c.label == label and v is not None]
            wrong = sum(v is None or v[0] != label for v, c in zip(verdicts, calls) if c.label == label)
            print(f"  {label:8s} n={sum(c.label == label for c in calls):2d} wrong={wrong}  verdict after answer: "
                  f"median {statistics.median(ts):.0f} ms, max {max(ts):.0f} ms")

    print(f"\n{len(calls)} scripted calls, {audio_s:.0f} s of callee audio, fed in 100 ms chunks")
    table("campaigns/amd.py (Asterisk AMD rules, defaults)",
          [(d.verdict.kind, d.verdict.at_ms) if d.verdict else None for d in ours])
    table("naive rule (greeting > 1.5 s)", [d.verdict for d in naive])
    errs = [abs(d.beep.start_ms - c.beep_ms) for d, c in zip(ours, calls) if c.beep_ms is not None and d.beep]
    found = sum(d.beep is not None for d, c in zip(ours, calls) if c.beep_ms is not None)
    print(f"beeps found {found}/{sum(c.beep_ms is not None for c in calls)}, start error median "
          f"{statistics.median(errs):.0f} ms, max {max(errs):.0f} ms")
    print(f"CPU per second of audio: amd.py {1e3 * cpu_ours / audio_s:.3f} ms, naive {1e3 * cpu_naive / audio_s:.3f} ms "
          f"(ratio {cpu_ours / cpu_naive:.2f}x; best of {ROUNDS})")
    assert all(d.verdict is not None for d in ours)
    print("hard cases (not in the set above):")
    for make in HARD:
        c = make()
        d = _run(lambda: AmdDetector(Amd(), RATE, listen_for_beep=True), c.samples)
        n = _run(lambda: NaiveGreetingRule(RATE), c.samples)
        print(f"  {c.label:7s} speech {c.greeting_ms:5.0f} ms: amd.py {d.verdict.kind} ({d.verdict.cause}, "
              f"{d.verdict.at_ms:.0f} ms{', beep ' + format(d.beep.start_ms, '.0f') + ' ms' if d.beep else ''}), "
              f"naive {n.verdict}")
