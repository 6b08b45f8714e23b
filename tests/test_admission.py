"""The admission policy (sip/admission.py) and the gate's reading of a request (sip/gate.py parse_request),
without a SIP stack: token buckets, the unacknowledged-INVITE block, reports once a minute, bounded state."""
from __future__ import annotations

import pytest

from callbot.sip import admission as adm
from callbot.sip.config import AdmissionConfig
from callbot.sip.gate import dialog_tags, parse_request

CFG = AdmissionConfig(invite_rate_per_source=2.0, invite_burst_per_source=4, invite_rate_total=10.0,
                      invite_burst_total=5, unacked_limit=3, unacked_window_s=60.0, block_s=30.0)


def test_token_bucket_gives_its_burst_then_its_rate():
    b = adm.TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait_s(0.0) == pytest.approx(0.5)
    assert b.take(0.5) and not b.take(0.5)
    assert b.take(100.0) and b.full(200.0)  # never more than the burst saved up


def test_a_source_over_its_rate_is_told_when_to_retry():
    a = adm.Admission(CFG, now=0.0)
    assert all(a.check_invite("10.0.0.1", 0.0) is None for _ in range(CFG.invite_burst_per_source))
    refusal = a.check_invite("10.0.0.1", 0.0)
    assert refusal.reason == adm.RATE and refusal.code == 503 and refusal.retry_after_s == 1
    assert a.check_invite("10.0.0.2", 0.0) is None  # another source has its own budget
    assert a.check_invite("10.0.0.1", 0.5) is None  # 2/s: one more after 0.5 s


def test_the_process_intake_is_shared_by_all_sources():
    a = adm.Admission(CFG, now=0.0)
    assert all(a.take_intake(0.0) is None for _ in range(CFG.invite_burst_total))
    refusal = a.take_intake(0.0)
    assert refusal.reason == adm.OVERLOAD and refusal.retry_after_s == 1
    assert a.take_intake(0.1) is None and a.admitted == CFG.invite_burst_total + 1


def test_unacknowledged_invites_block_their_source_for_a_while():
    a = adm.Admission(CFG, now=0.0)
    assert not a.unacked("10.0.0.1", 1.0) and not a.unacked("10.0.0.1", 2.0)
    assert a.blocked("10.0.0.1", 2.0) is None
    assert a.unacked("10.0.0.1", 3.0)  # the third within the window
    refusal = a.blocked("10.0.0.1", 3.0)
    assert refusal.reason == adm.BLOCKED and refusal.retry_after_s == 30
    assert a.check_invite("10.0.0.1", 10.0).reason == adm.BLOCKED
    assert a.blocked("10.0.0.1", 33.5) is None and a.check_invite("10.0.0.1", 33.5) is None
    assert a.counts[adm.UNACKED] == 3


def test_unacknowledged_invites_far_apart_are_forgiven():
    a = adm.Admission(CFG, now=0.0)
    for t in (0.0, 61.0, 122.0, 183.0):  # one a minute: never three within the 60 s window
        assert not a.unacked("10.0.0.1", t)


def test_a_source_is_reported_at_its_first_refusal_then_once_a_minute():
    a = adm.Admission(CFG, now=0.0)
    first = a.refused("10.0.0.1", adm.RATE, 0.0)
    assert first.first and first.counts == {adm.RATE: 1}
    assert all(a.refused("10.0.0.1", adm.RATE, t) is None for t in (1.0, 2.0, 30.0))
    assert a.refused("10.0.0.1", adm.NOT_SERVED, 59.0) is None
    later = a.refused("10.0.0.1", adm.RATE, 60.0)
    assert not later.first and later.counts == {adm.RATE: 4, adm.NOT_SERVED: 1}
    assert later.message(CFG) == ("SIP source 10.0.0.1, the last minute: 1 requests of a method we do not serve "
                                  "(405), 4 INVITEs over 2/s (503)")
    assert first.message(CFG).startswith("SIP source 10.0.0.1: 1 INVITEs over 2/s (503) (counted from now on")
    assert dict(a.counts) == {adm.RATE: 5, adm.NOT_SERVED: 1}
    # what is still pending goes out with the sweep once its minute is over
    assert a.refused("10.0.0.1", adm.RATE, 70.0) is None
    assert a.sweep(100.0) == []
    (swept,) = a.sweep(120.0)
    assert swept.counts == {adm.RATE: 1}


def test_idle_sources_are_forgotten_and_their_number_is_bounded():
    a = adm.Admission(CFG, now=0.0)
    a.check_invite("10.0.0.1", 0.0)
    a.sweep(1000.0)
    assert a.stats()["sources"] == 0
    n = adm.SOURCES_KEPT + 50
    reports = [a.refused(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", adm.RATE, 2000.0)  # a spoofed flood:
               for i in range(n)]                                                         # a new source a packet
    assert a.stats()["sources"] == adm.SOURCES_KEPT
    assert a.counts[adm.RATE] == n  # evicted sources still counted
    # reported one by one only within the report budget; the sweep sums up the rest in one report
    assert sum(r is not None for r in reports) == adm.REPORTS_BURST
    swept = a.sweep(2060.0)
    assert sum(sum(r.counts.values()) for r in swept) == n - adm.REPORTS_BURST
    assert len(swept) <= adm.REPORTS_BURST + 1 and swept[-1].source.endswith(" sources")
    assert a.sweep(2200.0) == []


INVITE = (b"INVITE sip:callbot@127.0.0.1:5060;transport=udp SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKx\r\n"
          b"f: \"\xff\xfe Mallory\" <sip:m@10.0.0.9>;tag=1\r\nt: <sip:callbot@127.0.0.1>\r\ni: abc\xc0\xaf\r\n"
          b"CSeq: 1 INVITE\r\nl: 5\r\n\r\nv=0\r\ntrailing")


def test_parse_request_reads_compact_headers_and_keeps_bad_bytes_as_escapes():
    req = parse_request(INVITE, "INVITE", "10.0.0.9", 5070)
    assert req.method == "INVITE" and req.source_ip == "10.0.0.9" and req.source == "10.0.0.9:5070"
    assert req.uri_user == "callbot" and not req.to_tag
    assert req.from_uri == "sip:m@10.0.0.9" and req.to_uri == "sip:callbot@127.0.0.1"
    assert req.call_id == "abc\\xc0\\xaf"  # encodable, and the same bytes a packet capture shows
    assert req.body == "v=0\r\n"  # Content-Length bounds the body
    req.call_id.encode("utf-8")


@pytest.mark.parametrize("to,tagged", [
    ("<sip:a@b>;tag=x", True), ("sip:a@b;tag=x", True), ("\"A;tag=no\" <sip:a@b;tag=uri-param>", False),
    ("<sip:a@b>", False), ("sip:a@b", False), ("<sip:a@b> ; TAG = x", True), ("<sip:a@b>;Tag=x", True),
    ("<sip:a@b>;tagged=1", False), ("<sip:a@b>;tag", False),
])
def test_parse_request_tells_in_dialog_requests_by_their_to_tag(to, tagged):
    raw = f"BYE sip:a@b SIP/2.0\r\nTo: {to}\r\nFrom: <sip:c@d>;tag=1\r\nCall-ID: 1\r\n\r\n".encode()
    assert parse_request(raw, "BYE", "127.0.0.1", 5060).to_tag is tagged


def test_parse_request_folded_headers_ipv6_and_no_blank_line():
    raw = b"\r\nOPTIONS sip:x@[::1] SIP/2.0\r\nTo: <sip:x@[::1]>\r\n ;tag=t\r\nCall-ID: 7\r\n"
    req = parse_request(raw, "OPTIONS", "::1", 5060)
    assert req.to_tag and req.source == "[::1]:5060" and req.call_id == "7" and req.body == ""


def test_source_reports_are_counted_in_prometheus_and_logged_as_json():
    from callbot.app.event_log import event_line
    from callbot.app.metrics import Metrics
    from callbot.sip.events import SourceRefused

    m = Metrics()
    first = SourceRefused(at=1.0, source="10.0.0.1", counts={adm.RATE: 1}, first=True, message="...")
    later = SourceRefused(at=61.0, source="10.0.0.1", counts={adm.RATE: 40, adm.UNACKED: 2}, first=False,
                          message="...")
    for e in (first, later):
        m.on_event(e)
    text = m.text()
    assert 'callbot_sip_refused_total{reason="rate"} 41.0' in text
    assert 'callbot_sip_refused_total{reason="unacked"} 2.0' in text
    assert b'"counts":{"rate":40,"unacked":2}' in event_line(later)


def test_sources_that_carry_many_callers_have_no_rate_and_are_never_blocked():
    a = adm.Admission(CFG, now=0.0, exempt=("192.0.2.7",))
    cfg_net = AdmissionConfig(exempt_sources=("10.9.0.0/16",))
    b = adm.Admission(cfg_net, now=0.0)
    for source, policy in (("127.0.0.1", a), ("192.0.2.7", a), ("10.9.3.4", b)):
        assert all(policy.check_invite(source, 0.0) is None for _ in range(100))
        assert not any(policy.unacked(source, t) for t in (1.0, 2.0, 3.0, 4.0))
        assert policy.blocked(source, 5.0) is None
    assert b.check_invite("127.0.0.1", 0.0) is None  # the default went with the replaced tuple...
    assert [b.check_invite("127.0.0.1", 0.0) for _ in range(30)][-1] is not None  # ...so it has a rate
    assert a.take_intake(0.0) is None  # the process-wide intake applies to everyone


def test_exempt_sources_must_be_addresses():
    with pytest.raises(ValueError, match="exempt_sources: 'edge.example.com' is not an IP address"):
        AdmissionConfig(exempt_sources=("edge.example.com",))


@pytest.mark.parametrize("head, tags", [
    ("From: <sip:a@h>;tag=f1\r\nTo: <sip:b@h>;tag=t1", ("f1", "t1")),
    ("f: <sip:a@h>;tag=f1\r\nt: <sip:b@h>", ("f1", None)),
    # folded onto a continuation line with spaces around '=' (RFC 4475 wsinv): the call's dialog is found
    ('From   :   "W S"\r\n <sip:ws@127.0.0.1> ; tag = ws1\r\nTo :\r\n\t<sip:b@h>;tag=x', ("ws1", "x")),
])
def test_dialog_tags_read_folded_and_compact_headers(head, tags):
    assert dialog_tags(f"INVITE sip:b@h SIP/2.0\r\n{head}\r\nCall-ID: c\r\n\r\nv=0\r\nFrom: <x>;tag=body") == tags
