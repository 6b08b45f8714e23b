"""The call's numbers (analytics/metrics.py) from hand-placed segments: each definition of docs/analytics.md
on a timeline small enough to work out by hand, and its edges (nobody speaks, one leg only, touching
segments, the dead-air threshold exactly met)."""
from __future__ import annotations

import numpy as np
import pytest

from callbot.analytics.metrics import (MetricParams, compute_metrics, gaps, intersection, longest_monologue,
                                       loudness_dbfs, response_latencies, union)
from callbot.analytics.result import Segment, Turn, Word


def seg(leg, a, b):
    return Segment(leg=leg, start_ms=float(a), end_ms=float(b))


# A 20 s call, worked out by hand:
#   bot     0.5- 4.0   greeting
#   caller  4.6- 7.0   question          (latency 600)
#   bot     7.9- 9.0                      (latency 900)
#   caller  8.5-10.0   barge-in at 8.5 into the bot (ends 9.0): yield 500, overtalk 500
#   bot    10.2-12.0                      (latency 200)
#   bot    12.5-13.0   same leg again: one monologue 10.2-13.0
#   caller 12.8-13.5   barge-in at 12.8 (bot ends 13.0): yield 200, overtalk 200
#   (silence 13.5-17.0: dead air 3.5 s)
#   bot    17.0-18.0   bot starts 3.5 s after the caller: latency 3500
#   (silence 18.0-20.0)
CALL = [
    seg("bot", 500, 4000), seg("caller", 4600, 7000), seg("bot", 7900, 9000), seg("caller", 8500, 10000),
    seg("bot", 10200, 12000), seg("bot", 12500, 13000), seg("caller", 12800, 13500), seg("bot", 17000, 18000),
]


@pytest.fixture
def m():
    return compute_metrics(CALL, 20000.0)


def test_talk_time_and_ratios(m):
    assert m.duration_ms == 20000.0
    assert m.caller.talk_ms == 2400 + 1500 + 700
    assert m.bot.talk_ms == 3500 + 1100 + 1800 + 500 + 1000
    assert m.caller.talk_ratio == pytest.approx(4600 / 20000)
    assert m.bot.talk_ratio == pytest.approx(7900 / 20000)
    assert m.talk_listen_ratio == pytest.approx(4600 / 7900, abs=1e-4)
    assert (m.caller.segments, m.bot.segments) == (3, 5)


def test_overtalk_interruptions_and_barge_ins(m):
    assert m.overtalk_ms == 500 + 200
    assert m.overtalk_count == 2
    assert m.caller.interruptions == 2
    assert m.bot.interruptions == 0  # the bot never started inside the caller's speech
    assert m.barge_ins == 2
    assert m.yield_ms == [500.0, 200.0]
    assert m.yield_p50_ms == 350.0


def test_non_talk_and_dead_air(m):
    # silent stretches: 0-0.5, 4.0-4.6, 7.0-7.9, 10.0-10.2, 12.0-12.5? no: caller speaks until 10.0, bot 10.2;
    # 12.0-12.5 the bot pauses while nobody else speaks; 13.5-17.0; 18.0-20.0
    assert m.non_talk_ms == 500 + 600 + 900 + 200 + 500 + 3500 + 2000
    assert (m.dead_air_ms, m.dead_air_count) == (3500.0, 1)
    assert compute_metrics(CALL, 20000.0, params=MetricParams(dead_air_ms=1000)).dead_air_count == 2
    assert compute_metrics(CALL, 20000.0, params=MetricParams(dead_air_ms=3500)).dead_air_count == 0  # longer than


def test_response_latency(m):
    # caller stops at 7.0 -> bot 7.9; at 10.0 -> 10.2; at 13.5 -> 17.0; (the caller stop at 10.0 came after the
    # bot segment 7.9-9.0 ended at 9.0: the bot was silent then)
    assert m.response_latency_ms == [900.0, 200.0, 3500.0]
    assert m.response_latency_p50_ms == 900.0
    assert m.response_latency_p99_ms == pytest.approx(float(np.percentile([900, 200, 3500], 99)), abs=0.1)
    assert response_latencies([(0, 1000)], [(6000, 7000)], window_ms=4000) == []  # too late to be an answer
    # the caller went on before the bot answered: only the later stop counts
    assert response_latencies([(0, 1000), (1500, 2000)], [(2300, 3000)], 15000) == [300.0]
    # the bot started while the caller spoke: an interruption, no latency
    assert response_latencies([(0, 1000)], [(900, 3000)], 15000) == []
    assert response_latencies([(0, 1000)], [(1000, 3000)], 15000) == [0.0]


def test_longest_monologue(m):
    assert m.bot.longest_monologue_ms == 3500.0  # 0.5-4.0; 10.2-13.0 is 2.8 s (the caller started at 12.8, inside)
    assert m.caller.longest_monologue_ms == 2400.0
    assert longest_monologue([(0, 1000), (1500, 4000)], []) == 4000.0
    assert longest_monologue([(0, 1000), (1500, 4000)], [(1200, 1300)]) == 2500.0
    # the other leg speaking on from before the run does not split it; a start inside does
    assert longest_monologue([(1000, 2000), (3000, 4000)], [(0, 5000)]) == 3000.0
    assert longest_monologue([(1000, 2000), (3000, 4000)], [(2500, 2600)]) == 1000.0


def test_words_per_minute_and_sentiment():
    words = [Word(leg="caller", start_ms=0, end_ms=100, text=f"w{i}") for i in range(10)]
    turns = [Turn(leg="caller", start_ms=0, end_ms=1, text="x", sentiment=0.5),
             Turn(leg="caller", start_ms=1, end_ms=2, text="y", sentiment=-0.1),
             Turn(leg="bot", start_ms=1, end_ms=2, text="z", sentiment=None)]
    m = compute_metrics([seg("caller", 0, 3000), seg("bot", 4000, 5000)], 6000.0, words=words, turns=turns)
    assert m.caller.words == 10
    assert m.caller.words_per_minute == 200.0  # 10 words in 3 s of talk
    assert (m.bot.words, m.bot.words_per_minute) == (0, 0.0)
    assert m.caller.sentiment == pytest.approx(0.2)
    assert m.bot.sentiment is None


def test_nobody_speaks():
    m = compute_metrics([], 10000.0)
    assert (m.caller.talk_ms, m.bot.talk_ms, m.overtalk_ms) == (0.0, 0.0, 0.0)
    assert m.talk_listen_ratio is None
    assert (m.non_talk_ms, m.dead_air_ms, m.dead_air_count) == (10000.0, 10000.0, 1)
    assert m.response_latency_p50_ms is None and m.yield_p50_ms is None
    assert compute_metrics([], 0.0).caller.talk_ratio == 0.0


def test_segments_past_the_end_are_clipped_and_overlapping_ones_merged():
    m = compute_metrics([seg("caller", 0, 3000), seg("caller", 2000, 4000), seg("bot", 4500, 9000)], 6000.0)
    assert m.caller.talk_ms == 4000.0 and m.caller.segments == 1
    assert m.bot.talk_ms == 1500.0


def test_interval_helpers():
    assert union([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]
    assert intersection([(0, 4), (6, 9)], [(3, 7), (8, 10)]) == [(3, 4), (6, 7), (8, 9)]
    assert gaps([(1, 2), (4, 5)], 0, 6) == [(0, 1), (2, 4), (5, 6)]
    assert gaps([(0, 6)], 0, 6) == []


def test_loudness_dbfs():
    rate = 16000
    t = np.arange(rate) / rate
    sine = (32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    leg = np.concatenate([np.zeros(rate, np.int16), sine // 10])  # -3 dBFS sine at -20 dB, after 1 s silence
    assert loudness_dbfs(leg, rate, [(1000, 2000)]) == pytest.approx(-23.01, abs=0.05)
    assert loudness_dbfs(leg, rate, []) is None
    assert loudness_dbfs(leg, rate, [(0, 1000)]) == -120.0
    m = compute_metrics([seg("caller", 1000, 2000)], 2000.0, loudness={"caller": -23.0, "bot": None})
    assert (m.caller.loudness_dbfs, m.bot.loudness_dbfs) == (-23.0, None)


def test_params_are_checked():
    with pytest.raises(ValueError):
        MetricParams(dead_air_ms=-1)
