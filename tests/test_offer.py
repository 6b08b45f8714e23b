"""validate_offer: which SDP offers get a 488 and why (sip/offer.py)."""

import pytest

from callbot.sip.offer import NO_ACTIVE_AUDIO, NO_AUDIO, NO_CODEC, NOT_SDP, validate_offer


def sdp(m="m=audio 4000 RTP/AVP 0 8 9 101", c="c=IN IP4 127.0.0.1", extra=(), media_c=None):
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-"]
    if c:
        lines.append(c)
    lines.append("t=0 0")
    if m:
        lines.append(m)
    if media_c:
        lines.append(media_c)
    lines += list(extra)
    return "\r\n".join(lines) + "\r\n"


ACCEPT = [
    ("pjsua default offer", sdp(extra=["a=rtpmap:101 telephone-event/8000", "a=sendrecv"])),
    ("PCMU only", sdp(m="m=audio 4000 RTP/AVP 0")),
    ("PCMA only", sdp(m="m=audio 4000 RTP/AVP 8")),
    ("G722 only", sdp(m="m=audio 4000 RTP/AVP 9")),
    ("static with matching rtpmap", sdp(m="m=audio 4000 RTP/AVP 9", extra=["a=rtpmap:9 G722/8000"])),
    ("dynamic PCMU", sdp(m="m=audio 4000 RTP/AVP 96", extra=["a=rtpmap:96 PCMU/8000"])),
    ("lower-case codec name", sdp(m="m=audio 4000 RTP/AVP 97", extra=["a=rtpmap:97 pcma/8000"])),
    ("SRTP profile", sdp(m="m=audio 4000 RTP/SAVP 0")),
    ("AVPF profile", sdp(m="m=audio 4000 RTP/AVPF 0")),
    ("media-level c= only", sdp(c=None, media_c="c=IN IP4 127.0.0.1")),
    ("IPv6", sdp(c="c=IN IP6 ::1")),
    ("host name", sdp(c="c=IN IP4 pbx.example.com")),
    ("video then audio", sdp(m="m=video 5000 RTP/AVP 96", extra=["m=audio 4000 RTP/AVP 0"])),
    ("disabled stream then a live one", sdp(m="m=audio 0 RTP/AVP 0", extra=["m=audio 4002 RTP/AVP 8"])),
    ("port count", sdp(m="m=audio 4000/2 RTP/AVP 0")),
    ("late offer (no body)", ""),
    ("LF line ends", sdp().replace("\r\n", "\n")),
    ("ptime 20 and maxptime 120", sdp(extra=["a=ptime:20", "a=maxptime:120"])),
    ("fractional ptime", sdp(extra=["a=ptime:22.5"])),
    ("eight m-lines, two audio", sdp(m="m=audio 4000 RTP/AVP 0",
                                     extra=[f"m=video {5000 + 2 * i} RTP/AVP 96" for i in range(6)] + ["m=audio 4002 RTP/AVP 8"])),
]


@pytest.mark.parametrize("name,text", ACCEPT, ids=[a[0] for a in ACCEPT])
def test_accepts(name, text):
    assert validate_offer(text) is None


REJECT = [
    ("address 999.1.1.1", sdp(c="c=IN IP4 999.1.1.1"), "bad connection address"),
    ("garbage address", sdp(c="c=IN IP4 -!-"), "bad connection address"),
    ("IP6 tag on an IPv4 address", sdp(c="c=IN IP6 127.0.0.1"), "is not IP6"),
    ("multicast", sdp(c="c=IN IP4 224.0.0.1"), "multicast"),
    ("bad c= shape", sdp(c="c=IN IP4"), "bad connection line"),
    ("no c= anywhere", sdp(c=None), "no connection address"),
    ("port 70000", sdp(m="m=audio 70000 RTP/AVP 0"), "out of range 0-65535"),
    ("port not a number", sdp(m="m=audio x RTP/AVP 0"), "out of range 0-65535"),
    ("payload type 200", sdp(m="m=audio 4000 RTP/AVP 200"), "payload type '200'"),
    ("payload type not a number", sdp(m="m=audio 4000 RTP/AVP abc"), "payload type 'abc'"),
    ("no audio m-line", sdp(m="m=video 5000 RTP/AVP 96"), NO_AUDIO),
    ("no m-line at all", sdp(m=None), NO_AUDIO),
    ("only port 0", sdp(m="m=audio 0 RTP/AVP 0"), NO_ACTIVE_AUDIO),
    ("only GSM and G729", sdp(m="m=audio 4000 RTP/AVP 3 18"), NO_CODEC),
    ("dynamic without rtpmap", sdp(m="m=audio 4000 RTP/AVP 96"), NO_CODEC),
    ("dynamic opus", sdp(m="m=audio 4000 RTP/AVP 111", extra=["a=rtpmap:111 opus/48000/2"]), NO_CODEC),
    ("PCMU at a wrong rate", sdp(m="m=audio 4000 RTP/AVP 96", extra=["a=rtpmap:96 PCMU/16000"]), NO_CODEC),
    ("static 0 remapped", sdp(m="m=audio 4000 RTP/AVP 0", extra=["a=rtpmap:0 speex/8000"]), NO_CODEC),
    ("only telephone-event", sdp(m="m=audio 4000 RTP/AVP 101", extra=["a=rtpmap:101 telephone-event/8000"]), NO_CODEC),
    ("not RTP", sdp(m="m=audio 4000 udp 0"), "is not RTP"),
    ("short m-line", sdp(m="m=audio 4000 RTP/AVP"), "malformed m-line"),
    ("malformed rtpmap", sdp(extra=["a=rtpmap:zz"]), "malformed rtpmap"),
    ("not SDP", "hello world", NOT_SDP),
    ("truncated at v", "v=", NOT_SDP),
    ("line without =", sdp(extra=["garbage"]), "malformed SDP line"),
    ("binary junk", "v=0\r\n\x00\x01\x02\r\n", "malformed SDP line"),
    ("limited broadcast", sdp(c="c=IN IP4 255.255.255.255"), "broadcast or reserved"),
    ("reserved 240/4", sdp(c=None, media_c="c=IN IP4 240.1.2.3"), "broadcast or reserved"),
    ("ptime 0", sdp(extra=["a=ptime:0"]), "ptime 0 ms out of range"),
    ("ptime negative", sdp(extra=["a=ptime:-20"]), "out of range"),
    ("ptime 2^32", sdp(extra=["a=ptime:4294967296"]), "out of range"),
    ("ptime not a number", sdp(extra=["a=ptime:twenty"]), "bad ptime"),
    ("maxptime 0", sdp(extra=["a=maxptime:0"]), "maxptime 0 ms"),
    ("hundreds of m-lines", sdp(extra=[f"m=audio {5000 + 2 * i} RTP/AVP 0" for i in range(300)]),
     "301 media streams (at most 8)"),
    ("three audio m-lines", sdp(extra=["m=audio 4002 RTP/AVP 0", "m=audio 4004 RTP/AVP 0"]), "3 audio streams (at most 2)"),
]


@pytest.mark.parametrize("name,text,reason", REJECT, ids=[r[0] for r in REJECT])
def test_rejects_with_reason(name, text, reason):
    got = validate_offer(text)
    assert got is not None and reason in got, got


def test_accepted_codecs_narrow_the_choice():
    assert validate_offer(sdp(m="m=audio 4000 RTP/AVP 0"), accepted=("G722",)) == NO_CODEC
    assert validate_offer(sdp(m="m=audio 4000 RTP/AVP 0 9"), accepted=("G722",)) is None


def test_unknown_accepted_codec_is_a_value_error():
    with pytest.raises(ValueError, match="opus"):
        validate_offer(sdp(), accepted=("opus",))


@pytest.mark.parametrize("address, port, local, refused", [
    ("127.0.0.1", 5060, (), True),            # loopback: ours whatever we bind
    ("127.0.0.1", 4000, (), False),           # not a service port
    ("0.0.0.0", 9464, (), True),
    ("203.0.113.7", 5060, ("203.0.113.7",), True),   # the address we announce
    ("203.0.113.8", 5060, ("203.0.113.7",), False),  # someone else's SIP port: their business
])
def test_audio_aimed_at_our_own_service_ports_is_refused(address, port, local, refused):
    """A caller must not make us send RTP into our own SIP or metrics port (a reflection)."""
    got = validate_offer(sdp(m=f"m=audio {port} RTP/AVP 0", c=f"c=IN IP4 {address}"),
                         protected={5060, 9464}, local_hosts=local)
    assert (got is not None and "own service port" in got) == refused, got
