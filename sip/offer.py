"""SDP offer screening: say why an INVITE's offer must get 488 before the call takes one of the 4 slots.

pjsua2 2.15.1 answers some nonsense offers (address 999.1.1.1, port 70000, payload type 200) as if they
were calls; each then holds a call slot until the missing ACK times out (~32 s), so four of them lock
real callers out (docs/architecture.md, "The wheel's limits"). `validate_offer` is the gate signalling
calls from `onIncomingCall`: it
returns None for an offer we can answer, else a one-line reason for the 488 and the log.

An empty body is a late offer (RFC 3261 13.2.1: we make the offer in the 200) and is accepted.

Offers that would make us a reflector are refused too: audio aimed at a broadcast or reserved address,
or at one of this machine's own service ports (SIP, metrics: `protected`), where our RTP would land in
our own parsers; and a packet time no codec frames at (a=ptime 0, negative, 2^32).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

# Codecs this endpoint answers with: name -> (static payload type, RTP clock rate). G.722's RTP clock
# is 8000 Hz for historical reasons (RFC 3551 4.5.2) although it carries 16 kHz audio.
CODECS: dict[str, tuple[int, int]] = {"PCMU": (0, 8000), "PCMA": (8, 8000), "G722": (9, 8000)}

_STATIC_PT = {pt: name for name, (pt, _) in CODECS.items()}
_DYNAMIC_PT = range(96, 128)
# RFC 4566 token for a host name: labels of letters, digits and hyphens, not all digits and dots
_HOSTNAME = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_RTPMAP = re.compile(r"^(\d+)\s+([^/\s]+)/(\d+)(?:/\d+)?$")

# a=ptime / a=maxptime in ms: pjmedia's codecs frame at 10-60 ms, trunks ask up to 120; RFC 3551 4.2's
# packets stay under 200 ms. Outside this the offer is nonsense (0, negative, 2^32 seen in scans)
PTIME_MS = (1, 200)

# m-lines an offer may have: a phone sends 1-3 (audio, video, T.38), one or two of them audio. pjsua
# opens sockets for the audio streams of an offer it takes up: 5 INVITEs of 12 audio m-lines (or 8 of 10)
# used up the wheel's 64 ioqueue handles and aborted the process (pj_ioqueue_register_sock2 assertion;
# found by tests/test_sip_torture.py); 12 of 8 were survived (4 taken up, 8 refused 486). Over 16 pjmedia's
# own parser answers 400.
MAX_MEDIA = 8
MAX_AUDIO = 2

NOT_SDP = "body is not SDP (no v=0 line)"
NO_AUDIO = "offer has no audio m-line"
NO_ACTIVE_AUDIO = "offer's audio streams are all disabled (port 0)"
NO_CODEC = "offer has no codec we take (PCMU 0, PCMA 8, G722 9, or a dynamic type mapped to one)"


def validate_offer(sdp_text: str, accepted: tuple[str, ...] = ("G722", "PCMU", "PCMA"), *,
                   protected: Collection[int] = (), local_hosts: Collection[str] = ()) -> str | None:
    """None when the offer is answerable, else the reason to reject it with 488 Not Acceptable Here.

    `accepted` names the codecs enabled on the endpoint (a subset of CODECS). `protected`: this
    machine's service ports (SIP transports, metrics) that audio must not be aimed at, on a loopback
    address or one of `local_hosts` (the addresses this endpoint binds and announces).
    """
    unknown = [c for c in accepted if c not in CODECS]
    if unknown:
        raise ValueError(f"accepted codecs {unknown} are not among {sorted(CODECS)}")
    if not sdp_text.strip():
        return None
    lines = [ln.strip() for ln in sdp_text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines or lines[0] != "v=0":
        return NOT_SDP

    # Split into the session part and one block per m-line.
    session: list[str] = []
    media: list[list[str]] = []
    for ln in lines:
        if len(ln) < 2 or ln[1] != "=":
            return f"malformed SDP line {ln[:40]!r}"
        if ln.startswith("m="):
            media.append([ln])
        elif media:
            media[-1].append(ln)
        else:
            session.append(ln)

    session_c = [ln for ln in session if ln.startswith("c=")]
    for ln in session_c:
        reason = _check_connection(ln)
        if reason:
            return reason
    for ln in session:
        reason = _check_ptime(ln)
        if reason:
            return reason

    if len(media) > MAX_MEDIA:
        return f"offer has {len(media)} media streams (at most {MAX_MEDIA})"
    audio = [block for block in media if block[0].startswith("m=audio")]
    if not audio:
        return NO_AUDIO
    if len(audio) > MAX_AUDIO:
        return f"offer has {len(audio)} audio streams (at most {MAX_AUDIO})"
    active = 0
    for block in audio:
        reason, port, codecs = _check_audio(block, accepted)
        if reason:
            return reason
        if port == 0:
            continue
        media_c = [ln for ln in block if ln.startswith("c=")]
        for ln in media_c:
            reason = _check_connection(ln)
            if reason:
                return reason
        if not media_c and not session_c:
            return "audio stream has no connection address (c= line)"
        for ln in block[1:]:
            reason = _check_ptime(ln)
            if reason:
                return reason
        address = (media_c or session_c)[-1][2:].split()[2]
        if port in protected and _is_local(address, local_hosts):
            return f"audio aimed at this machine's own service port {address}:{port}"
        active += 1
        if codecs:
            return None
    return NO_CODEC if active else NO_ACTIVE_AUDIO


def _check_connection(line: str) -> str | None:
    parts = line[2:].split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        return f"bad connection line {line[:60]!r}"
    # multicast addresses carry /ttl[/count]; a unicast call never does
    addr = parts[2]
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        if _HOSTNAME.match(addr) and len(addr) <= 253:
            return None
        return f"bad connection address {addr[:60]!r}"
    if (ip.version == 4) != (parts[1] == "IP4"):
        return f"connection address {addr} is not {parts[1]}"
    if ip.is_multicast:
        return f"connection address {addr} is multicast"
    if ip.version == 4 and ip.is_reserved:  # 240.0.0.0/4, the limited broadcast 255.255.255.255 among them
        return f"connection address {addr} is broadcast or reserved"
    return None


def _check_ptime(line: str) -> str | None:
    for attr in ("a=ptime:", "a=maxptime:"):
        if line.startswith(attr):
            value = line[len(attr):].strip()
            try:
                ms = float(value)
            except ValueError:
                return f"bad {attr[2:-1]} {value[:20]!r}"
            if not PTIME_MS[0] <= ms <= PTIME_MS[1]:
                return f"{attr[2:-1]} {value[:20]} ms out of range {PTIME_MS[0]}-{PTIME_MS[1]}"
    return None


def _is_local(address: str, local_hosts: Collection[str]) -> bool:
    """The address is this machine's: loopback, unspecified, or one it binds or announces."""
    if address in local_hosts:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower() == "localhost"
    return ip.is_loopback or ip.is_unspecified or any(h == str(ip) for h in local_hosts)


def _check_audio(block: list[str], accepted: tuple[str, ...]) -> tuple[str | None, int, list[str]]:
    """(reason, port, names of accepted codecs offered) for one m=audio block."""
    fields = block[0][2:].split()
    if len(fields) < 4:
        return f"malformed m-line {block[0][:60]!r}", 0, []
    port_text = fields[1].split("/", 1)[0]
    if not port_text.isdigit() or int(port_text) > 65535:
        return f"audio port {fields[1][:20]!r} out of range 0-65535", 0, []
    port = int(port_text)
    if not fields[2].startswith("RTP/") and "/RTP/" not in fields[2]:
        return f"audio transport {fields[2][:30]!r} is not RTP", port, []
    pts: list[int] = []
    for fmt in fields[3:]:
        if not fmt.isdigit() or int(fmt) > 127:
            return f"payload type {fmt[:20]!r} out of range 0-127", port, []
        pts.append(int(fmt))

    rtpmap: dict[int, tuple[str, int]] = {}
    for ln in block[1:]:
        if ln.startswith("a=rtpmap:"):
            m = _RTPMAP.match(ln[len("a=rtpmap:"):])
            if not m:
                return f"malformed rtpmap {ln[:60]!r}", port, []
            rtpmap[int(m.group(1))] = (m.group(2).upper(), int(m.group(3)))

    offered = []
    for pt in pts:
        if pt in _DYNAMIC_PT:
            if pt not in rtpmap:
                continue  # a dynamic type means nothing without its rtpmap
            name, rate = rtpmap[pt]
        elif pt in _STATIC_PT:
            name, rate = _STATIC_PT[pt], CODECS[_STATIC_PT[pt]][1]
            if pt in rtpmap and rtpmap[pt] != (name, rate):
                continue  # a static number mapped to another codec: trust neither
        else:
            continue  # a static codec we do not speak (GSM, G729, ...)
        if name in accepted and CODECS[name][1] == rate:
            offered.append(name)
    return None, port, offered
