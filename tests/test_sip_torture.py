"""A SIP torture suite against `callbot serve` (issue 11's tests): the kinds of message RFC 4475 lists,
valid and invalid, invalid UTF-8 in every header that reaches our code, NUL bytes, a 64 KB header,
thousands of Via headers, an SDP with hundreds of m-lines, offers aimed at our own ports - over UDP and
over TCP. After each batch the process is alive and a real caller connects and hears its own signal
echoed; at the end serve stops cleanly and its output holds no traceback.

The messages are written here from the RFC's descriptions of what each case exercises (its section
labels name them), not copied from it. What is asserted of the answers is only what must hold whatever
pjsip's parser decides: no offer aimed at us or at nothing becomes a call, and nothing crashes.
"""
from __future__ import annotations

import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import wave

import numpy as np
import pytest
from tests.sip_peers import PjsuaPeer, eventually, free_port, serve_config, stop_process

pytestmark = pytest.mark.timeout(240)
RATE = 16000
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
TONE_HZ = 700.0
TORTURER = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"  # macOS has only 127.0.0.1


def _message(method: str, port: int, call_id: str, *, ruri: str | None = None, headers: str = "",
             body: bytes = b"", content_type: str = "application/sdp", via: str | None = None,
             from_: str = '"Torture" <sip:torture@127.0.0.1>;tag=t1', to: str | None = None,
             cseq: str | None = None, transport: str = "UDP") -> bytes:
    """A request to serve's echo account with every part replaceable; Content-Length from the body
    unless `headers` gives one."""
    ruri = ruri or f"sip:echo@127.0.0.1:{port}"
    via = via or f"SIP/2.0/{transport} 127.0.0.1:9;rport;branch=z9hG4bK-{call_id}"
    to = to or f"<sip:echo@127.0.0.1:{port}>"
    cseq = cseq or f"1 {method}"
    length = "" if "content-length" in headers.lower() else f"Content-Length: {len(body)}\r\n"
    ctype = f"Content-Type: {content_type}\r\n" if body else ""
    head = (f"{method} {ruri} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: {from_}\r\nTo: {to}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\nContact: <sip:torture@127.0.0.1:9>\r\n{headers}{ctype}{length}\r\n")
    return head.encode("utf-8", "surrogateescape") + body


def _sdp(rtp_addr: str = "127.0.0.1", rtp_port: int = 9, extra_media: int = 0, pt: str = "9 0") -> bytes:
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", f"c=IN IP4 {rtp_addr}", "t=0 0",
             f"m=audio {rtp_port} RTP/AVP {pt}"]
    for i in range(extra_media):
        lines += [f"m=audio {20000 + 2 * i} RTP/AVP 0", "a=sendrecv"]
    return ("\r\n".join(lines) + "\r\n").encode()


def torture_messages(port: int, transport: str, own_ports: tuple[int, ...]) -> list[tuple[str, bytes]]:
    """(name, bytes) for one transport: RFC 4475's cases by label, then ours."""
    t = transport
    sdp = _sdp()
    m: list[tuple[str, bytes]] = []

    def add(name: str, method: str = "INVITE", **kw) -> None:
        m.append((name, _message(method, port, f"{t}-{name}", transport=t, **kw)))

    # RFC 4475 3.1.1: valid messages with unusual but legal forms
    m.append(("wsinv", (f"INVITE sip:echo@127.0.0.1:{port} SIP/2.0\r\nVia  :  SIP/2.0/{t}   127.0.0.1:9 ;"
                        f" branch = z9hG4bK-{t}-wsinv\r\nMax-Forwards:\t70\r\nTo :\r\n  <sip:echo@127.0.0.1:{port}>\r\n"
                        f"From   :   \"W S\"\r\n <sip:ws@127.0.0.1> ; tag = ws1\r\nCall-ID: {t}-wsinv\r\n"
                        f"CSeq:\r\n 1\r\n   INVITE\r\nContact: <sip:ws@127.0.0.1:9>\r\n"
                        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n").encode() + sdp))
    add("intmeth", method="!interesting-Method0123456789_*+`.%indeed'~",
        cseq="1 !interesting-Method0123456789_*+`.%indeed'~")
    add("esc01", ruri=f"sip:sips%3Auser%40example.com@127.0.0.1:{port}", body=sdp)
    add("escnull", ruri=f"sip:null-%00-null@127.0.0.1:{port}", to='<sip:null-%00-null@127.0.0.1>', method="REGISTER",
        cseq="1 REGISTER")
    add("esc02", method="RE%47IST%45R", cseq="1 RE%47IST%45R")
    add("lwsdisp", method="OPTIONS", from_='caller<sip:caller@127.0.0.1>;tag=lws', cseq="1 OPTIONS")
    add("longreq", headers=("X-Long: " + "a" * 3000 + "\r\n") + "".join(f"X-H{i}: {i}\r\n" for i in range(100)),
        to=f'"{"I" * 400}" <sip:echo@127.0.0.1:{port}>', body=sdp)
    m.append(("dblreq", _message("REGISTER", port, f"{t}-dblreq-a", transport=t, cseq="1 REGISTER")
              + _message("INVITE", port, f"{t}-dblreq-b", transport=t, body=sdp)))
    add("semiuri", method="OPTIONS", ruri=f"sip:user;par=u%40example.net@127.0.0.1:{port}", cseq="1 OPTIONS")
    add("transports", method="OPTIONS", cseq="1 OPTIONS",
        via=f"SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-{t}-tr1, SIP/2.0/SCTP 192.0.2.1;branch=z9hG4bKx, "
            f"SIP/2.0/TLS 192.0.2.2;branch=z9hG4bKy, SIP/2.0/UNKNOWN 192.0.2.3;branch=z9hG4bKz")
    boundary = "7a9cbec02ceef655"
    mpart = (f"--{boundary}\r\nContent-Type: application/sdp\r\n\r\n").encode() + sdp + (
        f"\r\n--{boundary}\r\nContent-Type: application/isup;version=itu-t92+\r\n\r\n").encode() + \
        bytes(range(0, 40)) + f"\r\n--{boundary}--\r\n".encode()
    add("mpart01", body=mpart, content_type=f"multipart/mixed;boundary={boundary}")
    add("unreason", method="OPTIONS", cseq="1 OPTIONS", headers="Subject: \u2603 snow \u00e9t\u00e9\r\n")
    # RFC 4475 3.1.2: invalid messages
    add("badinv01", headers="To: <sip:other@127.0.0.1>\r\nCSeq: 2 INVITE\r\n", body=sdp)  # doubled headers
    add("clerr", headers=f"Content-Length: {len(sdp) + 500}\r\n", body=sdp)                # longer than sent
    add("scalar02", headers="Content-Length: -999\r\n", body=sdp)
    add("scalarlg", method="REGISTER", cseq="36893488147419103232 REGISTER",
        headers="Expires: 1000000000000000000000000\r\nMax-Forwards: 300\r\n")
    add("quotbal", from_='"Bob <sip:bob@127.0.0.1>;tag=q1', body=sdp)
    add("ltgtruri", ruri=f"<sip:echo@127.0.0.1:{port}>", body=sdp)
    add("lwsruri", ruri=f"sip:echo@127.0.0.1:{port};lr=1 ; bogus", body=sdp)
    m.append(("lwsstart", b"   " + _message("OPTIONS", port, f"{t}-lwsstart", transport=t, cseq="1 OPTIONS")))
    m.append(("trws", _message("OPTIONS", port, f"{t}-trws", transport=t, cseq="1 OPTIONS").replace(
        b"SIP/2.0\r\n", b"SIP/2.0 \r\n", 1)))
    add("escruri", ruri=f"sip:echo@127.0.0.1:{port}?Route=%3Csip:example.com%3E", body=sdp)
    add("baddate", headers="Date: Fri, 01 Jan 2010 16:00:00 EST\r\n", body=sdp)
    add("regbadct", method="REGISTER", cseq="1 REGISTER", headers="Contact: sip:user@example.com?Route=%3Csip:x%3E\r\n")
    add("badaspec", method="OPTIONS", cseq="1 OPTIONS", from_="sip:bad@127.0.0.1;tag=ba",
        to=f"sip:echo@127.0.0.1:{port};tag=junk>")
    add("badbranch", via=f"SIP/2.0/{t} 127.0.0.1:9;branch=z9hG4bK;branch=\"\"", body=sdp)
    m.append(("insuf", f"INVITE sip:echo@127.0.0.1:{port} SIP/2.0\r\nContent-Length: 0\r\n\r\n".encode()))
    add("unkscm", ruri="nobodyknowsthisscheme:totallyopaquecontent", body=sdp)
    add("novelsc", method="OPTIONS", cseq="1 OPTIONS", ruri="soap.beep://192.0.2.1:3002")
    add("mismatch01", cseq="1 OPTIONS", body=sdp)
    m.append(("bigcode", (f"SIP/2.0 4294967301 better not break the receiver\r\nVia: SIP/2.0/{t} 127.0.0.1:{port};"
                          f"branch=z9hG4bK-nope\r\nCall-ID: {t}-bigcode\r\nCSeq: 1 INVITE\r\nFrom: <sip:a@b>;tag=1\r\n"
                          f"To: <sip:c@d>;tag=2\r\nContent-Length: 0\r\n\r\n").encode()))
    m.append(("badvers", _message("OPTIONS", port, f"{t}-badvers", transport=t, cseq="1 OPTIONS").replace(
        b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1)))
    add("mcl01", headers="Content-Length: 0\r\nContent-Length: 999\r\n", body=sdp)
    add("zeromf", method="OPTIONS", cseq="1 OPTIONS", headers="Max-Forwards: 0\r\n")
    add("inv2543", via=f"SIP/2.0/{t} 127.0.0.1:9", body=sdp)  # RFC 2543 style: no branch cookie
    # ours: text that is not UTF-8 in every header that reaches our code (record, log, events)
    for bad in ("\udcff\udcfe", "\udcc0\udcaf"):
        tag = "ff" if bad.startswith("\udcff") else "c0"
        add(f"utf8-from-{tag}", from_=f'"{bad}caller" <sip:{bad}@127.0.0.1>;tag=u{tag}', body=sdp)
        add(f"utf8-to-{tag}", to=f'"{bad}" <sip:echo@127.0.0.1:{port}>', body=sdp)
        m.append((f"utf8-callid-{tag}", _message("INVITE", port, f"{t}-cid-{tag}{bad}", transport=t, body=sdp)))
        add(f"utf8-headers-{tag}", headers=f"Subject: {bad}\r\nUser-Agent: {bad}\r\nAccept-Language: {bad}\r\n"
                                           f"X-Tenant: {bad}\r\n", body=sdp)
        add(f"utf8-ruri-{tag}", ruri=f"sip:{bad}@127.0.0.1:{port}", body=sdp)
    add("nul-header", headers="Subject: a\x00b\r\nX-Nul: \x00\x00\r\n", body=sdp)
    add("nul-body", body=sdp.replace(b"s=-", b"s=\x00-\x00"))
    add("huge-header", headers="X-Huge: " + "h" * 64_000 + "\r\n", body=sdp if t == "TCP" else b"")
    add("many-vias", via=", ".join(f"SIP/2.0/{t} 10.0.{i // 250}.{i % 250}:5060;branch=z9hG4bK{i}"
                                   for i in range(2000)), body=b"")
    add("many-mlines", body=_sdp(extra_media=300))
    for k in range(6):  # pjsua opened sockets for each audio stream: 5 of these aborted the process
        add(f"offer-twelve-audio-{k}", body=_sdp(extra_media=11))
    for i, own in enumerate(own_ports):
        add(f"offer-at-own-port-{i}", body=_sdp(rtp_port=own))
    add("offer-at-broadcast", body=_sdp(rtp_addr="255.255.255.255", rtp_port=4000))
    add("offer-ptime-zero", body=_sdp() + b"a=ptime:0\r\n")
    add("offer-ptime-huge", body=_sdp() + b"a=ptime:4294967296\r\n")
    return m


def _header(head: bytes, name: bytes) -> bytes:
    return next((h.split(b":", 1)[1].strip() for h in head.split(b"\r\n") if h.lower().startswith(name + b":")), b"")


def _end_dialog(s: socket.socket, port: int, reply: bytes) -> None:
    """ACK and BYE an INVITE's 2xx so that its call slot comes free at once (the next INVITE of the
    torture then reaches our own code, not pjsua's 486 for full slots). Bytes throughout: the
    Call-ID may not be UTF-8."""
    head = reply.split(b"\r\n\r\n", 1)[0]
    target = _header(head, b"contact").strip(b"<>").split(b">")[0] or f"sip:echo@127.0.0.1:{port}".encode()
    me = "%s:%d" % s.getsockname()
    dialog = (b"From: " + _header(head, b"from") + b"\r\nTo: " + _header(head, b"to") + b"\r\nCall-ID: "
              + _header(head, b"call-id") + b"\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n")
    cseq = _header(head, b"cseq").split(b" ")[0]
    for method, n, branch in ((b"ACK", cseq, b"ack"), (b"BYE", b"%d" % (int(cseq or b"1") + 1), b"bye")):
        s.sendto(method + b" " + target + b" SIP/2.0\r\nVia: SIP/2.0/UDP " + me.encode() + b";rport;branch=z9hG4bK"
                 + branch + cseq + b"\r\nCSeq: " + n + b" " + method + b"\r\n" + dialog + b"\r\n", ("127.0.0.1", port))


def _send_udp(port: int, messages: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Sends each datagram from one socket (rport: answers come back to it), ends every call a 2xx
    opens, and returns the first final answer seen per Call-ID."""
    answers: dict[str, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.bind((TORTURER, 0))
        s.settimeout(0.15)
        for _, data in messages:
            s.sendto(data[:65507], ("127.0.0.1", port))
            try:
                while True:  # what came back until the line goes quiet for 0.15 s
                    reply = s.recv(65536)
                    if not reply.startswith(b"SIP/2.0 ") or reply.startswith(b"SIP/2.0 1"):
                        continue
                    head = reply.split(b"\r\n\r\n", 1)[0]
                    answers.setdefault(_header(head, b"call-id").decode(errors="replace"), reply.split(b"\r\n", 1)[0])
                    if reply.startswith(b"SIP/2.0 2") and _header(head, b"cseq").endswith(b"INVITE"):
                        _end_dialog(s, port, reply)
            except (TimeoutError, socket.timeout):
                pass
    return answers


def _send_tcp(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Each message on a connection of its own, the connection closed after a short read."""
    for _, data in messages:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(TORTURER, 0)) as s:
            s.settimeout(0.3)
            s.sendall(data)
            try:
                s.recv(65536)
            except (TimeoutError, socket.timeout, ConnectionError):
                pass


def _tone(path: pathlib.Path, seconds: float = 30) -> pathlib.Path:
    t = np.arange(int(RATE * seconds)) / RATE
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes((8000 * np.sin(2 * np.pi * TONE_HZ * t)).astype("<i2").tobytes())
    return path


def _heard_tone(path: pathlib.Path) -> bool:
    data = path.read_bytes() if path.exists() else b""
    x = np.frombuffer(data[44:len(data) - (len(data) - 44) % 2], "<i2").astype(np.float64)
    if len(x) < RATE // 2 or np.abs(x).max() < 500:
        return False
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return abs(float(np.fft.rfftfreq(len(x), 1 / RATE)[np.argmax(spectrum)]) - TONE_HZ) < 20


def _call_echoes(uri: str, transport: str, tmp_path: pathlib.Path, label: str) -> None:
    """A real caller connects and hears its own tone come back. The well-formed INVITEs of the torture
    were answered; over TCP they are never ACKed: pjsua's 4 slots stay taken until our ACK timeout (4 s) drops
    them (issue 11's lockout point), the ones we ACKed end by our BYE or the RTP timeout, so the caller
    tries again on a 486 for at most 15 s."""
    heard = tmp_path / f"heard-{label}.wav"
    with PjsuaPeer(user=f"real-{label}", transport=transport, log_dir=tmp_path) as peer:
        def connected() -> str | None:
            call_id = peer.call(uri)
            while True:
                if any(e.get("call_id") == call_id for e in peer.all("media")):
                    return call_id
                gone = peer.all("disconnected", call_id=call_id)
                if gone:
                    assert gone[0]["code"] == 486, gone  # slots still held; anything else is a failure
                    return None
                eventually(lambda: peer.all("media", call_id=call_id) or peer.all("disconnected", call_id=call_id),
                           20, f"{label}: the call connects or is refused")
        call_id = eventually(connected, 15, f"{label}: a real call connects after the torture", interval=0.5)
        peer.send("record", call_id=call_id, path=str(heard))
        peer.send("play", call_id=call_id, path=str(_tone(tmp_path / f"tone-{label}.wav")))
        eventually(lambda: _heard_tone(heard), 20, f"{label}: the caller hears its tone echoed")
        peer.send("hangup", call_id=call_id)
        peer.expect("disconnected", call_id=call_id, timeout=15)


def _start(tmp: pathlib.Path, cfg: pathlib.Path, *args: str, ready: str) -> subprocess.Popen:
    out, err = (tmp / "serve.out").open("w"), (tmp / "serve.err").open("w")
    proc = subprocess.Popen([*CALLBOT, "serve", *args, "--engine", "echo", "--config", str(cfg)],
                            stdout=out, stderr=err, cwd=tmp)
    out.close(), err.close()
    eventually(lambda: proc.poll() is not None or ready in (tmp / "serve.err").read_text()
               + (tmp / "serve.out").read_text(), 60, f"serve: {ready!r}")
    assert proc.poll() is None, (tmp / "serve.err").read_text()
    return proc


@pytest.fixture(scope="module", params=["direct", "edge"])
def serve(request, tmp_path_factory):
    """`callbot serve --engine echo` on loopback, its output in files: "direct" with a UDP and a TCP
    transport of its own; "edge" behind `callbot serve --edge`'s kamailio (UDP and TCP on the edge's
    port, serve on UDP behind it). The torture comes from 127.0.0.2 so that the edge's flood ban on it
    spares the real caller on 127.0.0.1 (Linux routes all of 127/8 to loopback)."""
    tmp = tmp_path_factory.mktemp(f"torture-{request.param}")
    udp, tcp, metrics = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    # rtp_timeout_s: a torture INVITE we ACK but whose BYE pjsip does not match (a few of the odd ones)
    # is a silent call, which ends by RTP timeout like any caller that goes quiet
    if request.param == "direct":
        cfg = serve_config(tmp, udp, metrics, extra="rtp_timeout_s = 2",
                           tail=f'[[sip.transports]]\nname = "tcp"\nkind = "tcp"\nbind = "127.0.0.1"\n'
                                f'port = {tcp}\nrtp_port = 0\n')
        proc = _start(tmp, cfg, ready="listening")
        ports = {"UDP": udp, "TCP": tcp}
    else:
        if shutil.which("kamailio") is None and not pathlib.Path("/usr/sbin/kamailio").exists():
            pytest.skip("kamailio is not installed (Debian: kamailio)")
        edge_port = free_port()
        cfg = serve_config(tmp, udp, metrics, extra="rtp_timeout_s = 2",
                           tail=f'[edge]\naddress = "127.0.0.1"\nport = {edge_port}\nrun_dir = "edge"\n')
        proc = _start(tmp, cfg, "--edge", ready="edge: kamailio on")
        ports = {"UDP": edge_port, "TCP": edge_port}
        tcp = edge_port  # serve listens on UDP only; the edge's port is the one to protect
    try:
        yield {"mode": request.param, "proc": proc, "ports": ports, "own": (udp, tcp, metrics), "dir": tmp}
    finally:
        stop_process(proc, 30)


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_torture_messages_then_a_real_call_echoes(serve, transport, tmp_path):
    port = serve["ports"][transport]
    messages = torture_messages(port, transport, own_ports=serve["own"])
    assert len(messages) > 50
    if transport == "UDP":
        answers = _send_udp(port, messages)
        # an offer aimed at our own ports or the broadcast address, with a nonsense ptime or too many
        # audio streams is refused before pjsua takes it up (whatever the state of the call slots); through
        # the edge some never arrive (the edge bans the flooding source), none is answered 2xx
        for name in [n for n, _ in messages if n.startswith("offer-")]:
            answer = answers.get(f"UDP-{name}", b"")
            if serve["mode"] == "direct":
                assert answer == b"SIP/2.0 488 Not Acceptable Here", (name, answer)
            assert not answer.startswith(b"SIP/2.0 2"), (name, answer)
        # what a well-formed request gets back (rport: to our socket) shows the messages were taken up
        assert answers.get("UDP-intmeth", b"").startswith(b"SIP/2.0 501" if serve["mode"] == "direct"
                                                           else b"SIP/2.0 405"), answers
        assert answers.get("UDP-lwsdisp", b"").startswith(b"SIP/2.0 200"), answers
    else:
        _send_tcp(port, messages)
    assert serve["proc"].poll() is None, (serve["dir"] / "serve.err").read_text()[-3000:]
    uri = f"sip:echo@127.0.0.1:{port}" + (";transport=tcp" if transport == "TCP" else "")
    _call_echoes(uri, transport.lower(), tmp_path, f"{serve['mode']}-{transport}")
    assert serve["proc"].poll() is None


def test_serve_stops_cleanly_with_no_traceback_after_the_torture(serve):
    """Runs last for each serve (pytest keeps the file's order): serve (and its edge) exits 0 on SIGTERM
    and nothing it printed is a traceback."""
    assert stop_process(serve["proc"], 30, sig=signal.SIGTERM) == 0
    printed = (serve["dir"] / "serve.err").read_text(errors="replace") + \
        (serve["dir"] / "serve.out").read_text(errors="replace")
    assert "Traceback" not in printed, printed[-5000:]
