"""SIP accounts: registration to a registrar/PBX with digest auth, or direct mode with no registrar.

Direct mode is the embedded default: the account is reachable at sip:<user>@<host>:<port> of its
transport and needs no PBX. With a registrar, pjsip re-registers `refresh_before_s` before the granted
expiry; every answer becomes an event, and a refusal (401/403) becomes a RegistrationFailed naming the
account, while the endpoint keeps running. The policy for incoming INVITEs lives in call.py.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pjsua2 as pj

from .callbacks import guarded
from .config import AccountConfig
from .events import RegistrationChanged, RegistrationFailed
from .transports import Transport

if TYPE_CHECKING:
    from .endpoint import Endpoint

_SRTP = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL, "mandatory": pj.PJMEDIA_SRTP_MANDATORY}
_AUTH_REFUSED = (401, 403, 407)


def _hostport_of(uri: str) -> str:
    # "sip:user@host:port;params" -> "host:port" (or "host")
    rest = uri.split(":", 1)[1].split(";", 1)[0].split("?", 1)[0]
    return rest.rsplit("@", 1)[-1]


def _host_of(uri: str) -> str:
    hostport = _hostport_of(uri)
    if hostport.startswith("["):
        return hostport[: hostport.index("]") + 1]
    return hostport.split(":", 1)[0]


def _split_hostport(hostport: str) -> tuple[str, str | None]:
    # "host", "host:port", "[v6]", "[v6]:port" -> (host, port or None)
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else None
    host, sep, port = hostport.partition(":")
    return host, port if sep else None


def resolve_trusted(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Host names in trusted entries ("pbx.example.com[:port]") -> every address they resolve to.

    pjsip names an INVITE's source by IP address, so a registrar configured by name would otherwise
    match no INVITE at all. A name that does not resolve is kept as it is (it matches nothing; the
    registration against it fails and says so)."""
    out: list[str] = []
    for entry in entries:
        host, port = _split_hostport(entry)
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare)
            out.append(entry)
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(bare, None, type=socket.SOCK_DGRAM)
        except OSError:
            out.append(entry)
            continue
        for addr in dict.fromkeys(info[4][0] for info in infos):
            shown = f"[{addr}]" if ":" in addr else addr
            out.append(f"{shown}:{port}" if port else shown)
    return tuple(out)


def _source_matches(source: str, trusted: str, check_port: bool = True) -> bool:
    # source is pjsip's "host:port"; a trusted entry without a port takes any port of that host
    src_host, src_port = _split_hostport(source)
    host, port = _split_hostport(trusted)
    return src_host == host and (not check_port or port is None or port == src_port)


@dataclass(frozen=True)
class AccountState:
    """What the application may know of an account, without holding a pjsua2 object."""

    name: str
    uri: str  # its address of record (direct: where it is reachable)
    direct: bool
    registered: bool
    last_error: str | None  # the last registration failure, None once registered


class SipAccount(pj.Account):
    """One identity of the endpoint. Lives and dies on the endpoint's SIP thread."""

    def __init__(self, hub: Endpoint, cfg: AccountConfig, transport: Transport):
        super().__init__()
        self.hub = hub
        self.cfg = cfg
        self.name = cfg.name
        self.transport = transport
        self.registered = False
        self.last_error: str | None = None
        if cfg.direct:
            self.uri = f"sip:{cfg.user}@{transport.host}:{transport.port}{transport.uri_params()}"
        else:
            self.uri = f"sip:{cfg.user}@{cfg.domain or _host_of(cfg.registrar)}"
        if cfg.trusted_sources is not None:
            self.trusted: tuple[str, ...] | None = resolve_trusted(cfg.trusted_sources)
        elif cfg.direct:
            self.trusted = None
        else:
            self.trusted = resolve_trusted((_hostport_of(cfg.registrar),))

    def trusts(self, source: str) -> bool:
        """Whether an INVITE from `source` ("host:port") may reach this account."""
        if self.trusted is None:
            return True
        # over TCP/TLS the registrar may connect from an ephemeral port: only its host can be checked
        check_port = self.transport.kind == "udp"
        return any(_source_matches(source, t, check_port) for t in self.trusted)

    @property
    def accepts_late_offer(self) -> bool:
        """Whether an INVITE without an SDP offer is answered: by default only on a registered account,
        whose INVITEs come from its registrar; in direct mode anyone could send one and never ACK."""
        late = self.cfg.accept_late_offer
        return (not self.cfg.direct) if late is None else late

    def pj_config(self) -> pj.AccountConfig:
        cfg = self.cfg
        ac = pj.AccountConfig()
        ac.idUri = self.uri
        ac.sipConfig.transportId = self.transport.pj_id
        if cfg.proxy:
            # ";lr": a loose router, so the request URI stays the callee's (RFC 3261 16.12)
            ac.sipConfig.proxies.append(cfg.proxy if ";lr" in cfg.proxy else cfg.proxy + ";lr")
        if not cfg.direct:
            ac.regConfig.registrarUri = cfg.registrar
            ac.regConfig.timeoutSec = cfg.expires_s
            ac.regConfig.delayBeforeRefreshSec = cfg.refresh_before_s
            ac.regConfig.dropCallsOnFail = False
            ac.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", cfg.realm, cfg.auth_user or cfg.user, 0, cfg.password or "")
            )
        # RTP leaves from the address SIP does and the SDP announces the public one, unless the transport
        # gives RTP its own (SIP on loopback behind the edge, RTP on the public address)
        tcfg = self.hub.config.transport_of(cfg)
        ac.mediaConfig.transportConfig.port = tcfg.rtp_port
        rtp_bind = tcfg.rtp_bind or tcfg.bind
        if rtp_bind != "0.0.0.0":
            ac.mediaConfig.transportConfig.boundAddress = rtp_bind
        rtp_public = tcfg.rtp_public_address or tcfg.public_address
        if rtp_public:
            ac.mediaConfig.transportConfig.publicAddress = rtp_public
        ac.mediaConfig.srtpUse = _SRTP[cfg.srtp]
        ac.mediaConfig.srtpSecureSignaling = 1 if cfg.srtp_require_tls else 0
        return ac

    @guarded
    def onRegState(self, prm):
        code, reason = int(prm.code), str(prm.reason)
        now = time.monotonic()
        if 200 <= code < 300:
            self.registered = prm.expiration > 0
            self.last_error = None
            self.hub._emit(RegistrationChanged(
                at=now, account=self.name, code=code, reason=reason,
                expires_s=int(prm.expiration), registered=self.registered))
            return
        self.registered = False
        if code in _AUTH_REFUSED:
            message = (f"account {self.name!r} ({self.cfg.auth_user or self.cfg.user}) was refused by "
                       f"registrar {self.cfg.registrar}: {code} {reason} - check user, password and realm")
        else:
            message = (f"account {self.name!r} could not register at {self.cfg.registrar}: {code} {reason}"
                       f" - pjsip retries later")
        self.last_error = message
        self.hub._emit(RegistrationFailed(at=now, account=self.name, code=code, reason=reason, message=message))

    @guarded
    def onIncomingCall(self, prm):
        self.hub._incoming_call(self, prm)
