"""Answering-machine detection (campaigns/amd.py) on scripted espeak-ng audio with known timings."""
from __future__ import annotations

import numpy as np
import pytest

from callbot.campaigns.amd import HUMAN, MACHINE, MACHINE_END_BEEP, UNKNOWN, AmdDetector
from callbot.campaigns.config import Amd
from tests.campaign_calls import human, labelled_set, machine, silence, tone


def run(samples: np.ndarray, params: Amd = Amd(), beep: bool = True, chunk: int = 1600, rate: int = 16000):
    d = AmdDetector(params, rate, listen_for_beep=beep)
    for i in range(0, len(samples), chunk):
        d.feed(samples[i:i + chunk])
    return d


def test_a_long_greeting_and_a_beep_is_a_machine_and_the_beep_is_found_within_50_ms():
    callee = machine()
    d = run(callee.samples)
    assert d.verdict.kind == MACHINE
    assert d.verdict.at_ms <= Amd().total_analysis_ms
    assert d.verdict.at_ms < callee.beep_ms  # decided during the greeting, long before its end
    assert abs(d.beep.start_ms - callee.beep_ms) <= 50
    assert abs(d.beep.end_ms - callee.beep_end_ms) <= 50
    assert d.answered_by == MACHINE_END_BEEP and d.done


def test_hello_then_silence_is_a_human_after_the_after_greeting_silence():
    callee = human("hello?")
    d = run(callee.samples)
    assert d.verdict.kind == HUMAN and d.verdict.cause == "HUMAN"
    speech_end = 400 + callee.greeting_ms
    assert speech_end + Amd().after_greeting_silence_ms - 40 <= d.verdict.at_ms <= speech_end + 1000
    assert d.beep is None and d.done


def test_silence_past_initial_silence_is_a_machine_by_asteriskss_rule():
    d = run(silence(4000), beep=False)
    assert (d.verdict.kind, d.verdict.cause, d.verdict.at_ms) == (MACHINE, "INITIALSILENCE", 2500)


def test_talking_on_without_a_decision_ends_unknown_at_total_analysis():
    # short words with pauses too short for after_greeting_silence, too few for max_words, too little voice
    # in all for greeting_ms: nothing decides, so total_analysis_ms does
    params = Amd(max_words=50, greeting_ms=60000, max_word_ms=60000)
    word = tone(150, 80)  # 80 ms: below min_word_ms, never a word
    samples = np.concatenate([np.concatenate([word, silence(300)]) for _ in range(30)])
    d = run(samples, params, beep=False)
    assert (d.verdict.kind, d.verdict.cause, d.verdict.at_ms) == (UNKNOWN, "TOOLONG", 5000)


def test_chunk_size_and_rate_do_not_change_the_verdict():
    callee = machine(lead_ms=500)
    a = run(callee.samples, chunk=160)
    b = run(callee.samples, chunk=16000)
    assert (a.verdict, a.beep) == (b.verdict, b.beep)
    import soxr

    narrow = np.rint(soxr.resample(callee.samples.astype(np.float32), 16000, 8000)).astype(np.int16)
    c = run(narrow, rate=8000, chunk=800)
    assert c.verdict.kind == MACHINE and abs(c.beep.start_ms - callee.beep_ms) <= 50


def test_a_tone_outside_the_beep_band_or_too_short_is_no_beep():
    for samples in (np.concatenate([machine().samples[:16000 * 3], tone(3000, 600), silence(500)]),
                    np.concatenate([machine().samples[:16000 * 3], tone(1000, 120), silence(500)])):
        d = run(samples)
        assert d.verdict.kind == MACHINE and d.beep is None and not d.done


def test_a_beep_without_a_greeting_is_a_machine():
    d = run(np.concatenate([silence(600), tone(1000, 400), silence(1000)]))
    assert d.verdict.kind == MACHINE and d.verdict.cause == "BEEP"
    assert abs(d.beep.start_ms - 600) <= 20


def test_the_labelled_set_is_classified_without_a_mistake():
    calls = labelled_set()
    assert len(calls) >= 20
    for callee in calls:
        d = run(callee.samples)
        assert d.verdict.kind == callee.label, (callee.label, callee.greeting_ms, d.verdict)
        if callee.beep_ms is not None:
            assert abs(d.beep.start_ms - callee.beep_ms) <= 50


def test_bad_rate_is_refused():
    with pytest.raises(ValueError):
        AmdDetector(Amd(), 4000)
