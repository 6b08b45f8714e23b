"""SIP transports (UDP, TCP, TLS) created from configuration, and the address each really listens on.

Port 0 lets the OS choose (tests, several processes on one host); the chosen port is read back from
pjsip so that direct-mode accounts can publish a reachable sip:<user>@<host>:<port>.
"""
from __future__ import annotations

from dataclasses import dataclass

import pjsua2 as pj

from .config import TransportConfig

_KINDS = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}


@dataclass(frozen=True)
class Transport:
    name: str
    kind: str
    pj_id: int
    host: str  # published host: public address, else the bound address
    port: int

    def uri_params(self) -> str:
        """The URI parameter that makes a peer use this transport (UDP is SIP's default)."""
        return "" if self.kind == "udp" else f";transport={self.kind}"


def create_transport(ep: pj.Endpoint, cfg: TransportConfig) -> Transport:
    tc = pj.TransportConfig()
    tc.port = cfg.port
    tc.boundAddress = "" if cfg.bind == "0.0.0.0" else cfg.bind
    if cfg.public_address:
        tc.publicAddress = cfg.public_address
    if cfg.kind == "tls":
        tc.tlsConfig.certFile = cfg.cert_file
        tc.tlsConfig.privKeyFile = cfg.key_file
        tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
        if cfg.ca_file:
            tc.tlsConfig.CaListFile = cfg.ca_file
            tc.tlsConfig.verifyServer = True
    try:
        tid = ep.transportCreate(_KINDS[cfg.kind], tc)
    except pj.Error as exc:
        raise ValueError(
            f"transport {cfg.name!r}: cannot listen on {cfg.kind} {cfg.bind}:{cfg.port}: {exc.info()}"
        ) from None
    info = ep.transportGetInfo(tid)
    # localName is the published name ("host:port"); for port 0 it holds the port the OS gave
    host, _, port = info.localName.rpartition(":")
    if cfg.public_address:
        host = cfg.public_address
    elif cfg.bind != "0.0.0.0":
        host = cfg.bind
    return Transport(name=cfg.name, kind=cfg.kind, pj_id=tid, host=host.strip("[]"), port=int(port))
