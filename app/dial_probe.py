"""Is anything listening where `callbot call` sends its INVITE? A call to a UDP port where nothing listens
would otherwise wait for pjsip's INVITE timeout (Timer B, 64 x T1 = 32 s).

Why the app asks and not pjsip: pjsip's UDP transport sends from one unconnected socket, and the kernel
gives an ICMP "port unreachable" only to a connected socket, so pjsip never learns that nothing is there.
This opens a connected UDP socket to the same address and sends it a SIP keep-alive (CRLF CRLF,
RFC 5626 4.4.1: every SIP stack ignores it); "connection refused" back means the host said that nothing
listens. Only for a target the URI names by IP address (no DNS: pjsip might resolve a name elsewhere),
over UDP and with no outbound proxy in between. A firewall that drops packets says nothing: the caller's
no-response limit covers that.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable

KEEPALIVE = b"\r\n\r\n"
_URI = re.compile(r"^sip:(?:[^@;?]*@)?(?P<host>\[[0-9a-fA-F:.]+\]|[^:;?>\[]+)(?::(?P<port>\d+))?(?P<params>;[^?>]*)?")


def udp_target(uri: str) -> tuple[str, int] | None:
    """(address, port) the INVITE for `uri` goes to over UDP, when the URI says so without DNS; else None."""
    m = _URI.match(uri.strip().strip("<>"))
    if m is None:
        return None
    params = (m.group("params") or "").lower()
    transport = re.search(r";transport=([^;]+)", params)
    if transport is not None and transport.group(1) != "udp":
        return None
    host = m.group("host").strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: pjsip's resolver (SRV, then A/AAAA) may pick another address or port
    port = int(m.group("port") or 5060)
    return (host, port) if 0 < port < 65536 else None


class PortProbe:
    """A keep-alive sent now to `target`; `refused(timeout)` says whether the host answered that nothing
    listens there (False also when it could not tell)."""

    def __init__(self, target: tuple[str, int]):
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self._sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.connect(target)
            self._sock.send(KEEPALIVE)
        except OSError:
            self.close()

    def refused(self, timeout: float) -> bool:
        if self._sock is None:
            return False
        self._sock.settimeout(timeout)
        try:
            self._sock.recv(512)  # anything but an error: something is there
        except ConnectionRefusedError:
            return True
        except OSError:  # timeout, unreachable network: no word from a listener either way
            return False
        finally:
            self.close()
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class NoResponseWatch:
    """Gives up on a dialled call that hears nothing back: at once when its host refuses the port (the
    probe above), else after `limit_s` without a SIP response of any kind, by calling `hang_up` on a
    thread of its own. `reason` then says why, for the user's one line."""

    def __init__(self, uri: str, hang_up: Callable[[], None], target: tuple[str, int] | None, *,
                 limit_s: float, probe_s: float):
        self.reason: str | None = None
        self._uri, self._hang_up, self._target = uri, hang_up, target
        self._limit_s, self._probe_s = limit_s, probe_s
        self._settled = threading.Event()  # a response came, or the call is over: nothing to watch
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="no-response-watch", daemon=True)
        self._thread.start()

    def heard(self) -> bool:
        """A response came (call it for each): True if it counts, False if the watch gave up first (the
        487 pjsip makes up for the hang-up, say)."""
        with self._lock:
            if self.reason is not None:
                return False
            self._settled.set()
            return True

    def close(self) -> None:
        self._settled.set()
        self._thread.join(self._probe_s + 1)

    def _run(self) -> None:
        start = time.monotonic()
        why = None
        if self._target is not None and PortProbe(self._target).refused(self._probe_s):
            host, port = self._target
            why = f"nothing listens at {host}:{port} (its host answered 'port unreachable')"
        elif not self._settled.wait(max(0.0, self._limit_s - (time.monotonic() - start))):
            why = (f"no SIP response within {self._limit_s:g} s: nothing listens there, or a firewall drops "
                   "what we send")
        with self._lock:
            if why is None or self._settled.is_set():
                return
            self.reason = f"{self._uri}: {why}"
        try:
            self._hang_up()
        except (ValueError, RuntimeError):  # ended meanwhile, or the endpoint is stopping
            pass
