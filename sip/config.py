"""Configuration of the SIP endpoint: transports, accounts, call policy, codecs.

Frozen msgspec Structs that reject unknown fields, so a typo in the (later TOML) configuration is an
error naming the field instead of a setting silently ignored. Cross-field rules live in __post_init__
and raise ValueError with a message that says what is wrong and why.
"""
from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# the pjsua2-python wheel is compiled with PJSUA_MAX_CALLS = 4: no configuration can go beyond it
WHEEL_MAX_CALLS = 4

Port = Annotated[int, Meta(ge=0, le=65535)]  # 0 = let the OS pick a free port
Seconds = Annotated[float, Meta(gt=0)]


class _Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class TransportConfig(_Config):
    """One SIP listening socket. `public_address` is what goes into Contact/Via (NAT, containers)."""

    name: str = "udp"
    kind: Literal["udp", "tcp", "tls"] = "udp"
    bind: str = "0.0.0.0"
    port: Port = 5060
    public_address: str | None = None
    # first RTP port for calls on this transport's accounts (RTCP = RTP + 1; the next pair is tried when
    # taken); 0 = ports chosen by the OS
    rtp_port: Port = 4000
    # where this transport's calls bind their RTP sockets, and the address their SDP gives callers (None:
    # `bind` and `public_address`): behind the edge, SIP stays on loopback while RTP faces the callers
    rtp_bind: str | None = None
    rtp_public_address: str | None = None
    # TLS only: PEM files; the peer's certificate is not verified unless ca_file is given
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("transport name must not be empty (accounts refer to transports by name)")
        if self.kind == "tls" and not (self.cert_file and self.key_file):
            raise ValueError(f"transport {self.name!r}: kind 'tls' needs cert_file and key_file (PEM paths)")
        if self.kind != "tls" and (self.cert_file or self.key_file or self.ca_file):
            raise ValueError(f"transport {self.name!r}: cert_file/key_file/ca_file apply to kind 'tls' only")


class AccountConfig(_Config):
    """A SIP identity. Without `registrar` it is a direct account, reachable at sip:<user>@<host>:<port>.

    With `registrar` it registers there (digest auth with user/password, realm "*" = any) and
    re-registers `refresh_before_s` before the `expires_s` the registrar granted runs out.
    """

    name: str = "default"
    user: str = "callbot"
    transport: str | None = None  # transport name; None = the endpoint's first transport
    registrar: str | None = None  # e.g. "sip:pbx.example.com:5060"; None = direct mode
    domain: str | None = None  # host part of the address of record; default: the registrar's host
    auth_user: str | None = None  # default: user
    password: str | None = None
    # name of an environment variable holding the password, so that config files carry no secret;
    # resolved when the serve configuration is loaded (app/settings.py)
    password_env: str | None = None
    realm: str = "*"
    # outbound proxy every request of this account goes through (a PBX or trunk that routes our calls);
    # None = requests go where their URI says
    proxy: str | None = None
    expires_s: Annotated[int, Meta(ge=1)] = 300
    refresh_before_s: Annotated[int, Meta(ge=1)] = 5
    # where INVITEs for this account may come from: "host" or "host:port" entries. None = anyone for a
    # direct account, only the registrar's host (and port, when its URI names one) for a registered one
    # - a PBX extension must not be callable by anyone who can reach the socket
    trusted_sources: tuple[str, ...] | None = None
    srtp: Literal["off", "optional", "mandatory"] = "off"
    srtp_require_tls: bool = False  # refuse SRTP keys sent over a transport that is not TLS
    auto_answer: bool = True
    ring_delay_s: Annotated[float, Meta(ge=0)] = 0.0
    max_call_duration_s: Seconds | None = None
    # no RTP from the peer for this long (it vanished: crash, network gone) -> hang up; not while on hold
    rtp_timeout_s: Seconds | None = 30.0
    # an INVITE without an SDP offer (late offer: we would offer in the 200 and learn the caller's media only
    # from its ACK): None = accepted from a registered account's trusted registrar, refused (488) in direct
    # mode, where anyone can send one and leave it unanswered
    accept_late_offer: bool | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("account name must not be empty (events and errors name accounts)")
        if not self.user or any(c in self.user for c in "@:;<> "):
            raise ValueError(f"account {self.name!r}: user {self.user!r} must be a plain SIP user part")
        if self.registrar is not None and not self.registrar.startswith(("sip:", "sips:")):
            raise ValueError(f"account {self.name!r}: registrar {self.registrar!r} must be a sip: or sips: URI")
        if self.proxy is not None and not self.proxy.startswith(("sip:", "sips:")):
            raise ValueError(f"account {self.name!r}: proxy {self.proxy!r} must be a sip: or sips: URI")
        if self.password is not None and self.password_env is not None:
            raise ValueError(f"account {self.name!r}: give password or password_env, not both")
        if self.registrar is None and (self.password is not None or self.password_env is not None):
            raise ValueError(f"account {self.name!r}: a password needs a registrar (direct mode has no login)")
        if self.refresh_before_s >= self.expires_s:
            raise ValueError(
                f"account {self.name!r}: refresh_before_s ({self.refresh_before_s}) must be below "
                f"expires_s ({self.expires_s}), or registration would refresh in a loop"
            )

    @property
    def direct(self) -> bool:
        return self.registrar is None


class AdmissionConfig(_Config):
    """How much any source may ask of the endpoint before pjsua takes its INVITE up (sip/admission.py).

    Sources are IP addresses. Over its rate a source's INVITEs get 503 with Retry-After; one that leaves
    `unacked_limit` answered INVITEs without ACK within `unacked_window_s` is refused for `block_s`. The
    total rate bounds what all sources together hand pjsua: the wheel's 64 ioqueue handles (BENCHMARKS.md,
    "SIP floods"). A public port still wants the kamailio edge in front (`callbot edge`).
    """

    invite_rate_per_source: Annotated[float, Meta(gt=0)] = 10.0  # INVITEs a second, sustained
    invite_burst_per_source: Annotated[int, Meta(ge=1)] = 20
    # each INVITE pjsua takes up holds 2 of the 64 handles (RTP, RTCP) for ~0.5 s after its refusal: 32 within
    # 0.5 s abort the process, 50/s held for 30 s, 60/s aborted after 12 s (BENCHMARKS.md "SIP floods").
    # burst + rate/2 INVITEs in any 0.5 s: 20, 40 handles, beside 4 calls' 8 and the SIP sockets
    invite_rate_total: Annotated[float, Meta(gt=0)] = 20.0
    invite_burst_total: Annotated[int, Meta(ge=1)] = 10
    # an INVITE we answered 200 whose ACK has not come after this long is hung up, freeing its call slot
    # (pjsip itself would wait 32 s for the ACK)
    ack_timeout_s: Seconds = 4.0
    # a call we hang up whose BYE is still unanswered after this long is dropped (no more retransmissions
    # waited for): pjsua keeps the call slot until the BYE's transaction ends, 32 s for a peer that is gone
    # (an RTP timeout, a caller whose network dropped), so 4 such calls locked the line for half a minute
    bye_timeout_s: Seconds = 2.0
    unacked_limit: Annotated[int, Meta(ge=1)] = 3
    unacked_window_s: Seconds = 60.0
    block_s: Seconds = 60.0
    # addresses or CIDR networks that carry many callers: no per-source rate, never blocked for answers left
    # unacknowledged (the process-wide intake still applies). Default: this machine's loopback address, from
    # which the edge (`callbot serve --edge`, kamailio on 0.0.0.0) reaches serve - blocking it would lock
    # every caller out. Add an edge's or a trunk's own address; accounts' trusted_sources (and registrars)
    # are exempt too
    exempt_sources: tuple[str, ...] = ("127.0.0.1", "::1")
    # False: no module of ours in front of pjsua (sip/gate.py), as before it existed - for measurements;
    # floods then reach pjsua and can abort the process
    gate: bool = True

    def __post_init__(self) -> None:
        for entry in self.exempt_sources:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"admission.exempt_sources: {entry!r} is not an IP address or CIDR network "
                                 f"(e.g. \"10.0.0.5\", \"192.0.2.0/24\")") from None


DEFAULT_CODECS = ("G722/16000", "PCMU/8000", "PCMA/8000")


class EndpointConfig(_Config):
    """The whole endpoint: one per process (pjsip allows no second)."""

    transports: tuple[TransportConfig, ...] = (TransportConfig(),)
    accounts: tuple[AccountConfig, ...] = (AccountConfig(),)
    max_calls: Annotated[int, Meta(ge=1, le=WHEEL_MAX_CALLS)] = WHEEL_MAX_CALLS
    # codecs offered/accepted, best first; every codec not listed is disabled
    codecs: tuple[str, ...] = DEFAULT_CODECS
    # rate of pjmedia's conference bridge; streams at other rates are resampled by pjmedia
    # every call's port runs at this rate, so it must be one the engine's resamplers serve (CALL_RATES)
    conference_clock_rate: Literal[8000, 16000, 24000] = 16000
    dial_timeout_s: Seconds = 30.0
    user_agent: str = "callbot"
    # pjsip's own log, at pjlib's levels: 0 nothing, 1 errors, 2 warnings, 3 info, 4-6 debug. It goes to
    # log_file (appended) when one is given, else to Python's logging as logger "callbot.sip.pjsip", which
    # `callbot serve` leaves without a handler: out of the user's way unless asked for
    log_level: Annotated[int, Meta(ge=0, le=6)] = 2
    log_file: str | None = None
    # per-source and process-wide limits on INVITEs, and the ACK timeout (AdmissionConfig)
    admission: AdmissionConfig = AdmissionConfig()
    # this machine's service ports besides the SIP transports' (which are always in): an offer aiming its
    # audio at one of them on a local address is refused 488 (our RTP would land in our own parser)
    protected_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.transports:
            raise ValueError("endpoint needs at least one transport")
        if not self.codecs:
            raise ValueError("endpoint needs at least one codec")
        names = [t.name for t in self.transports]
        if len(set(names)) != len(names):
            raise ValueError(f"transport names must be unique, got {names}")
        accs = [a.name for a in self.accounts]
        if len(set(accs)) != len(accs):
            raise ValueError(f"account names must be unique, got {accs}")
        for acc in self.accounts:
            if acc.transport is not None and acc.transport not in names:
                raise ValueError(f"account {acc.name!r}: transport {acc.transport!r} is not one of {names}")

    def transport_of(self, account: AccountConfig) -> TransportConfig:
        if account.transport is None:
            return self.transports[0]
        return next(t for t in self.transports if t.name == account.transport)
