"""The public SIP edge: kamailio on the public port in front of `callbot serve` on loopback.

Why: the pjsua2 wheel serve runs on holds 4 calls and 64 socket handles per process, aborts (pj_assert)
when an INVITE flood takes the handles, lets four unacknowledged INVITEs lock its line, and speaks TLS
through a bundled OpenSSL 1.0.2 (issue 11). None of that is ours to change, so pjsua2 does not face
the internet: kamailio takes the public port and ends floods (pike, then a ban), new calls above a
rate, malformed requests (sanity), scanners, methods we do not serve, REGISTER, requests in dialogs
it did not set up, and TLS (the system's OpenSSL 3). Serve, bound to 127.0.0.1, sees the calls that
passed.

`callbot edge` runs kamailio alone (serve started separately on the loopback port its config names, or
the `[edge] nodes` it lists); `callbot serve --edge` runs both, kamailio as a child that stops with serve;
`callbot serve --edge --workers N` runs N serve processes behind it (app/workers.py); `callbot call
--edge` places one call out through it.

One destination gets a fixed route. Several (workers, nodes) get kamailio's dispatcher module: one set,
round robin among those that answer their OPTIONS pings, a destination that does not answer an INVITE
taken out until it answers a ping again, a 486/503 (a full worker, a model with no room) tried on the
next, and a call's requests after the INVITE sent to the destination that took it (kept with the dialog). The kamailio configuration is generated from `[edge]` and serve's transport
each time, written to read like one written by hand (short route blocks, comments saying why), and
checked with `kamailio -c` before it runs. Serve's own settings behind the edge (RTP on the public side,
the edge exempt from its per-source limits, its outbound proxy) are derived from the same `[edge]`
table (`serve_settings`), so that one table is the whole public deployment.

kamailio talks to serve from a loopback socket of its own (`inside_address`) and to the world from the
public one: serve sees a single source that is exempt, and its requests in a call go to a local address,
never to the advertised one that a host behind NAT may not reach from inside.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import msgspec

from callbot.engine.serving.stderr_line import say
from callbot.app.errors import StartupError
from callbot.app.settings import EdgeSettings, Settings
from callbot.sip.config import TransportConfig

# what a user is told when the program is missing (one line, exit status 2)
NOT_INSTALLED = ("kamailio is not installed (the SIP edge runs it): install the `kamailio` package "
                 "(Debian/Ubuntu: apt install kamailio; macOS: brew install kamailio)")
NO_TLS_MODULE = ("TLS at the edge needs kamailio's tls module (tls.so, not in {dirs}): install the "
                 "`kamailio-tls-modules` package (Debian/Ubuntu)")
# where kamailio's modules live, relative to the prefix its binary is installed under (Debian's
# multiarch folder first; Homebrew and source installs use lib/kamailio/modules)
_MODULE_DIRS = ("lib/{multiarch}/kamailio/modules", "lib64/kamailio/modules", "lib/kamailio/modules")
# the methods serve answers; everything else gets 405 at the edge
ALLOWED = "INVITE, ACK, BYE, CANCEL, OPTIONS, REFER, INFO, NOTIFY, UPDATE, PRACK"
# counters the configuration keeps (kamcmd ... cnt.get script NAME; `Edge.counters()`)
COUNTERS = ("flood_sources", "flood_dropped", "malformed", "refused", "calls_limited", "calls_passed",
            "calls_drained")
READY_TIMEOUT_S = 15.0
# TCP/TLS connections one source may hold at the edge (kamailio 5.8+): a phone holds one, a trunk a few, an
# office behind one NAT address one per phone
TCP_CONNECTIONS_PER_SOURCE = 64
# the dispatcher's health checks: an OPTIONS to every destination each PING_INTERVAL_S; PING_FAILURES
# unanswered in a row take it out, one answer brings it back
PING_INTERVAL_S = 1
PING_FAILURES = 2
DIALOG_ANSWERED = ("3", "4")  # kamailio's dialog states: confirmed without ACK, confirmed
PING_TIMEOUT_S = 5  # tm's fr_timer in a dispatching edge: a request with no answer at all fails after this
DISPATCH_SET = 1  # the dispatcher's set (group) of serve destinations
DRAIN_RETRY_AFTER_S = 30  # what a caller refused during a drain is told (this edge is going away)


@dataclass(frozen=True)
class Backend:
    """Where kamailio sends calls: serve's UDP socket on loopback."""

    host: str
    port: int

    @property
    def uri_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{self.uri_host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"sip:{self}"

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)


def node_backends(edge: EdgeSettings) -> list[Backend]:
    """`[edge] nodes`: serve on other machines (or other ports), each a destination beside the local ones."""
    return [Backend(host, port) for host, port in edge.node_addresses]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve_transport(settings: Settings) -> tuple[int, TransportConfig]:
    """Serve's transport that callers reach (the first account's), with its index in sip.transports."""
    sip = settings.sip
    transport = sip.transport_of(sip.accounts[0]) if sip.accounts else sip.transports[0]
    return sip.transports.index(transport), transport


def check_edge(edge: EdgeSettings, serve_host: str = "127.0.0.1") -> None:
    """What must hold in [edge] alone."""
    if edge.address == "0.0.0.0" and edge.advertise:
        # kamailio writes the receiving socket's own address into Record-Route, not advertised_address:
        # callers behind the NAT would send their ACK and BYE to the private address
        raise StartupError("$.edge.address: with advertise, name the local address callers' packets arrive on "
                           "(behind NAT: the private IP, e.g. \"10.0.0.5\"), not 0.0.0.0")
    for i, node in enumerate(node_backends(edge)):
        if node.is_loopback and node.port == edge.port:
            raise StartupError(f"$.edge.nodes[{i}]: {node} is the edge's own port on loopback")


def check_settings(settings: Settings) -> None:
    """What must hold between serve's transport and the edge; each error names the field to change."""
    edge = settings.edge
    check_edge(edge)
    i, t = _serve_transport(settings)
    where = f"$.sip.transports[{i}]"
    if t.kind != "udp":
        raise StartupError(f"{where}.kind: the edge reaches serve over UDP on loopback: set kind = \"udp\"")
    if not _is_loopback(t.bind):
        raise StartupError(f"{where}.bind: behind the edge serve listens on loopback only (the public "
                           f"port is kamailio's): set bind = \"127.0.0.1\" (it is {t.bind!r})")
    if t.port == edge.port:
        # the edge listens on loopback at its own port too (its side facing serve)
        raise StartupError(f"{where}.port: serve and the edge both want port {t.port} on loopback: give serve "
                           "another (e.g. 5070)")
    if edge.address == "0.0.0.0" and ":" in t.bind:
        raise StartupError(f"{where}.bind: with [edge] address 0.0.0.0 the edge binds IPv4 only: set bind = "
                           "\"127.0.0.1\"")


def backend_of(settings: Settings) -> Backend:
    """Serve's address as its config names it (`callbot edge`, serve started on its own)."""
    check_settings(settings)
    i, t = _serve_transport(settings)
    if t.port == 0:
        raise StartupError(f"$.sip.transports[{i}].port: the edge needs serve on a fixed port (0 lets the "
                           "OS choose; `callbot serve --edge` reads the chosen one back)")
    return Backend("127.0.0.1" if t.bind == "localhost" else t.bind, t.port)


def inside_address(edge: EdgeSettings, backend: Backend | str) -> str:
    """The edge's own address on serve's side: its public address when that is a loopback one (tests),
    else the loopback address of serve's family. kamailio sends serve everything from there, so that
    serve sees one exempt source and its requests in a call go to a local address - never to the
    advertised public one, which a host behind NAT often cannot reach from inside."""
    if _is_loopback(edge.address):
        return "127.0.0.1" if edge.address == "localhost" else edge.address
    host = backend.host if isinstance(backend, Backend) else backend
    return "::1" if ":" in host else "127.0.0.1"


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve_settings(settings: Settings) -> Settings:
    """The settings serve runs with behind the edge (`callbot serve --edge`, `callbot call --edge`),
    derived from the user's so that one [edge] table is enough:

    - the RTP of serve's transport binds the edge's public address (`rtp_bind`) and its SDP announces
      `advertise`, else that address (`rtp_public_address`): the edge carries signalling only, and
      RTP left on loopback with SIP would never reach a remote caller (a value the user set wins);
    - the edge's address on serve's side (`inside_address`, loopback) is in `[sip.admission]
      exempt_sources`: every call arrives from there, and serve's per-source limits must not count the
      whole internet as one source (the edge applies its own per caller);
    - direct accounts on that transport send their requests outside a call (`callbot call`'s INVITE)
      through the edge (`proxy`): serve, bound to loopback, cannot reach a callee itself;
    - the edge's ports are among `protected_ports`: no caller's offer may aim serve's RTP at kamailio.
    """
    check_settings(settings)
    edge = settings.edge
    i, t = _serve_transport(settings)
    inside = inside_address(edge, "127.0.0.1" if t.bind == "localhost" else t.bind)
    public = None if edge.address == "0.0.0.0" else edge.address
    transport = msgspec.structs.replace(
        t, rtp_bind=t.rtp_bind or edge.address,
        rtp_public_address=t.rtp_public_address or edge.advertise or public)
    transports = settings.sip.transports[:i] + (transport,) + settings.sip.transports[i + 1:]
    proxy = f"sip:{_uri_host(inside)}:{edge.port};lr"
    accounts = tuple(
        msgspec.structs.replace(a, proxy=proxy)
        if a.direct and a.proxy is None and settings.sip.transport_of(a).name == t.name else a
        for a in settings.sip.accounts)
    admission = settings.sip.admission
    exempt = admission.exempt_sources
    if not any(ipaddress.ip_address(inside) in ipaddress.ip_network(e, strict=False) for e in exempt):
        exempt = (*exempt, inside)
    protected = tuple(dict.fromkeys((*settings.sip.protected_ports, edge.port, edge.tls_port)))
    sip = msgspec.structs.replace(settings.sip, transports=transports, accounts=accounts, protected_ports=protected,
                                  admission=msgspec.structs.replace(admission, exempt_sources=exempt))
    return msgspec.structs.replace(settings, sip=sip)


def public_exposure_warning(settings: Settings) -> str | None:
    """One line for `callbot serve` without the edge on a non-loopback address (issue 11, point 2)."""
    exposed = [t for t in settings.sip.transports if not _is_loopback(t.bind)]
    if not exposed:
        return None
    where = ", ".join(f"{t.kind} {t.bind}:{t.port}" for t in exposed)
    return (f"callbot: warning: SIP on {where} with no edge in front: pjsua2 alone does not survive floods "
            "from the internet; on a public address run `callbot serve --edge` (README, Public deployment)")


def resolve_paths(settings: Settings, base_dir: str | os.PathLike) -> Settings:
    """[edge] paths in a config file are relative to that file, like the others (app/settings.py)."""
    edge = settings.edge

    def resolve(p: str | None) -> str | None:
        return None if p is None else os.fspath(pathlib.Path(base_dir) / os.path.expanduser(p))

    edge = msgspec.structs.replace(edge, cert_file=resolve(edge.cert_file), key_file=resolve(edge.key_file),
                                   ca_file=resolve(edge.ca_file), run_dir=resolve(edge.run_dir))
    return msgspec.structs.replace(settings, edge=edge)


# ---------------------------------------------------------------------------------------------------
# finding kamailio


def find_kamailio(edge: EdgeSettings) -> str:
    """The kamailio program's path; StartupError naming the package when it is not installed."""
    found = shutil.which(edge.kamailio)
    if found is None:
        raise StartupError(NOT_INSTALLED)
    return found


def find_modules_dir(edge: EdgeSettings, kamailio: str | None) -> str:
    """kamailio's module folder: [edge] modules_dir, else the one beside the installed program."""
    if edge.modules_dir:
        return edge.modules_dir
    multiarch = getattr(sys.implementation, "_multiarch", "") or "x86_64-linux-gnu"
    prefixes = []
    if kamailio:
        prefixes.append(pathlib.Path(os.path.realpath(kamailio)).parent.parent)  # <prefix>/sbin/kamailio
        prefixes.append(pathlib.Path(kamailio).parent.parent)  # Homebrew: the link's prefix, not the Cellar's
    prefixes += [pathlib.Path("/usr"), pathlib.Path("/usr/local"), pathlib.Path("/opt/homebrew")]
    for prefix in prefixes:
        for rel in _MODULE_DIRS:
            d = prefix / rel.format(multiarch=multiarch)
            if (d / "tm.so").is_file():
                return os.fspath(d)
    raise StartupError("kamailio's modules (tm.so, sl.so, ...) were not found beside the program: set "
                       "[edge] modules_dir")


def has_module(modules_dir: str, name: str) -> bool:
    return any((pathlib.Path(d) / f"{name}.so").is_file() for d in modules_dir.split(":") if d)


# ---------------------------------------------------------------------------------------------------
# the configuration


def destinations(edge: EdgeSettings, local: Backend | Sequence[Backend]) -> list[Backend]:
    """Where the edge sends calls: `local` (serve, or serve's workers, on this machine), then `[edge] nodes`."""
    found: list[Backend] = []
    for b in ([local] if isinstance(local, Backend) else list(local)) + node_backends(edge):
        if b not in found:
            found.append(b)
    if not found:
        raise StartupError("$.edge.nodes: the edge has nowhere to send calls: list serve's nodes (\"HOST:PORT\")")
    return found


def render(edge: EdgeSettings, backend: Backend | Sequence[Backend], *, modules_dir: str, run_dir: str,
           source: str = "callbot's config", version: tuple[int, ...] | None = None,
           dispatch: bool | None = None) -> str:
    """The kamailio configuration for `edge` in front of `backend` (one serve, or several workers) and
    `[edge] nodes`, as text; `version` is kamailio's (kamailio_version), for what only newer ones have
    (None: what 5.6 takes). `dispatch`: the dispatcher module even for one destination (the supervisor
    marks its workers up and down); None: when there are several. The dispatcher reads its list from
    `run_dir`/dispatcher.list (dispatcher_list: the file's text)."""
    dests = destinations(edge, backend)
    dispatch = len(dests) > 1 if dispatch is None else dispatch
    first = dests[0]
    v = {
        "source": source, "backend": ", ".join(map(str, dests)), "bhost": first.host, "buri": first.uri_host,
        "bport": first.port, "set": DISPATCH_SET, "ping": PING_INTERVAL_S, "ping_failures": PING_FAILURES,
        "ping_timeout": PING_TIMEOUT_S, "ping_timeout_ms": 1000 * PING_TIMEOUT_S,
        "drain_retry": DRAIN_RETRY_AFTER_S,
        "workers": edge.workers, "modules": modules_dir, "run_dir": run_dir,
        "port": edge.port, "tls_port": edge.tls_port, "idle": edge.tcp_idle_s,
        "max_conn": edge.tcp_max_connections, "unit": 2, "density": edge.requests_per_s * 2,
        "rps": edge.requests_per_s, "ban": edge.ban_s, "cps": edge.calls_per_s,
        "total": edge.total_calls_per_s, "open": edge.open_calls_per_source,
        "allowed": ALLOWED, "inside": _uri_host(inside_address(edge, first)),
        "trusted": ",".join(str(ipaddress.ip_network(s, strict=False)) for s in edge.trusted_sources),
        "outbound_socket": _outbound_socket(edge),
        "keepalive": edge.dialog_keepalive_s,
        "keepalive_on": ('dlg_set_property("ka-src");  # [edge] dialog_keepalive_s: both sides asked in turn\n'
                         '\tdlg_set_property("ka-dst");\n\t') if edge.dialog_keepalive_s else "",
    }
    parts = [_HEAD % v, _listen(edge, v), _TCP % v, _tcp_per_source(version), _MODULES % v]
    if edge.tls:
        parts.append(_tls_params(edge))
    parts.append(_PARAMS % v)
    if edge.dialog_keepalive_s:
        parts.append(_KEEPALIVE_PARAMS % v)
    if not dispatch:
        parts.append(_TM_TIMEOUT % v)  # a dispatching edge sets it with the dispatcher's pings
    if dispatch:
        v["from_serve"] = f'ds_is_from_list("{DISPATCH_SET}", "2")'  # address and port, any transport
        parts.append(_DISPATCHER_PARAMS % v + "".join(f"#   {line}\n" for line in dispatcher_list(edge, dests)
                                                     .splitlines() if not line.startswith("#")))
        parts += [_MAIN % v, (_FLOOD_TRUSTED if edge.trusted_sources else _FLOOD) % v, _DIALOG_HEAD % v,
                  _DISPATCH_IN_DIALOG % v, _NEW % v, _limits(edge, v), _DISPATCH % v, _serve_socket(edge, dests, v),
                  _SIPS_REPLY, _DISPATCH_FAILED % v, _FROM_SERVE % v]
    else:
        v["from_serve"] = f'$si == "{first.host}" && $sp == {first.port}'
        parts += [_MAIN % v, (_FLOOD_TRUSTED if edge.trusted_sources else _FLOOD) % v, _DIALOG_HEAD % v,
                  _FIXED_IN_DIALOG % v, _NEW % v, _limits(edge, v), _TO_SERVE % v, _SIPS_REPLY, _SERVE_FAILED,
                  _FROM_SERVE % v]
    return "\n".join(parts)


def _socket_to(edge: EdgeSettings, dest: Backend) -> str | None:
    """The edge's socket that requests to `dest` leave from: its inside one for serve on this machine, its
    public one for another machine (none on every address: the kernel's route picks, mhomed)."""
    if dest.is_loopback:
        return f"udp:{_uri_host(inside_address(edge, dest))}:{edge.port}"
    if edge.address == "0.0.0.0":
        return None
    return f"udp:{_uri_host(edge.address)}:{edge.port}"


def dispatcher_list(edge: EdgeSettings, dests: Sequence[Backend]) -> str:
    """The dispatcher's list file: set, URI, flags (8: pinged), priority, attributes (the socket its
    requests and pings leave from)."""
    lines = ["# serve's destinations, generated by callbot with the configuration beside it",
             "# set  destination  flags  priority  attributes"]
    for d in dests:
        sock = _socket_to(edge, d)
        lines.append(f"{DISPATCH_SET} {d.uri} 8 0" + (f" socket={sock}" if sock else ""))
    return "\n".join(lines) + "\n"


def _serve_socket(edge: EdgeSettings, dests: Sequence[Backend], v: dict) -> str:
    """route[SERVE_SOCKET]: the socket towards the destination in $du (_socket_to, decided here by its
    address, since a call's later requests set $du from the dialog, not through the dispatcher)."""
    inside = f"udp:{v['inside']}:{edge.port}"
    remote = None if edge.address == "0.0.0.0" else f"udp:{_uri_host(edge.address)}:{edge.port}"
    head = ("# Requests to serve leave from the edge's side facing it: its loopback socket for serve on this machine"
            + (", its public one\n# for other machines" if any(not d.is_loopback for d in dests) else "") + "\n"
            + "route[SERVE_SOCKET] {\n")
    if all(d.is_loopback for d in dests):
        return head + f"\tforce_send_socket({inside});\n}}\n"
    body = (f'\tif (is_in_subnet("$dd", "127.0.0.0/8,::1/128")) {{\n\t\tforce_send_socket({inside});\n\t}}')
    if remote is not None:
        body += f" else {{\n\t\tforce_send_socket({remote});\n\t}}"
    else:
        body += "\n\t# other machines: from the address the kernel routes from (mhomed)"
    return head + body + "\n}\n"


_HEAD = """\
#!KAMAILIO
#
# callbot's public SIP edge, generated by `callbot edge` from the [edge] table of %(source)s:
# change that, not this file (it is written again at every start).
#
# kamailio holds the public port so that `callbot serve` (pjsua2: 4 calls and 64 socket handles per
# process, an assert that aborts when they run out) sees only, on loopback at %(backend)s, the calls
# that passed here. What stops here: floods (pike, then a ban), new calls above a rate, malformed
# requests (sanity), scanners, methods we do not serve, REGISTER (we are no registrar), requests in
# dialogs we did not set up. RTP does not pass through kamailio: it goes between caller and serve.

####### Global parameters #########

debug=0                 # warnings and worse, our own "flood from ..." lines among them
log_stderror=yes        # the log goes where callbot's goes, not to syslog
children=%(workers)d              # processes reading each UDP socket
tcp_children=%(workers)d          # processes serving TCP and TLS connections
auto_aliases=no         # "myself" is the addresses below, not every name DNS has for them
server_signature=no     # our answers tell scanners nothing about what runs here
sip_warning=0
server_header="Server: callbot-edge"
user_agent_header="User-Agent: callbot-edge"
"""


def _listen(edge: EdgeSettings, v: dict) -> str:
    lines = ["# the public side; serve, on loopback, is reached from it"]
    if edge.tls:
        lines.append("enable_tls=yes")
    if edge.address == "0.0.0.0":
        lines += ["# every local address, 127.0.0.1 (serve's side) among them: kamailio binds each one (a",
                  "# wildcard socket would write 0.0.0.0 into Record-Route and Via)",
                  f"port={edge.port}"]
        if edge.tls:
            lines.append(f"tls_port_no={edge.tls_port}")
        lines += ["# requests leave from the address the kernel routes them from: to serve from 127.0.0.1, to",
                  "# a callee from the public one",
                  "mhomed=1"]
    else:
        host = _uri_host(edge.address)
        sockets = [("udp", edge.port), ("tcp", edge.port)] + ([("tls", edge.tls_port)] if edge.tls else [])
        for proto, port in sockets:
            advertise = f" advertise {edge.advertise}:{port}" if edge.advertise else ""
            lines.append(f"listen={proto}:{host}:{port}{advertise}")
        if not _is_loopback(edge.address):
            lines += ["# serve's side: what goes to serve leaves from here, and serve's requests come here, so",
                      "# that serve sees one loopback source and never needs the advertised address",
                      f"listen=udp:{v['inside']}:{edge.port}"]
    if edge.advertise:
        lines.append(f'alias="{edge.advertise}"')
    return "\n".join(lines) + "\n"


def _outbound_socket(edge: EdgeSettings) -> str:
    """route[OUTBOUND]'s choice of socket for a call serve places: the public one of the callee's transport
    (kamailio would send from the socket the INVITE came in on, serve's side on loopback). On every
    address, mhomed picks the one the kernel routes from."""
    if edge.address == "0.0.0.0":
        return ""
    host = _uri_host(edge.address)
    return ("\t# out from the public side (the INVITE came in on serve's side, loopback)\n"
            f'\tif ($rP == "tcp") {{\n\t\tforce_send_socket(tcp:{host}:{edge.port});\n\t}} else {{\n'
            f'\t\tforce_send_socket(udp:{host}:{edge.port});\n\t}}\n')


_TCP = """\
# TCP and TLS: a connection that carries no message for %(idle)d s is closed and their number is
# capped, so that connections held open cannot shut the transport (pjsua2 alone accepts 62, ever)
tcp_connection_lifetime=%(idle)d
tcp_max_connections=%(max_conn)d
tls_max_connections=%(max_conn)d
tcp_connect_timeout=5   # s, to callers, for the requests serve sends them in their calls
"""

def _tcp_per_source(version: tuple[int, ...] | None) -> str:
    """A cap on one source's TCP/TLS connections: kamailio's core has one from 5.8 (tcp_accept_iplimit);
    no 5.6 module sees a connection before its first message, and an idle held connection sends none
    (tcpops' event routes run when connections close), so older ones leave it to the firewall."""
    if version is not None and version >= (5, 8):
        return ("# one source may hold at most this many TCP/TLS connections (the rest are refused at accept)\n"
                f"tcp_accept_iplimit={TCP_CONNECTIONS_PER_SOURCE}\n")
    return ("# no cap per source on TCP/TLS connections: kamailio has one from 5.8 on (tcp_accept_iplimit), this\n"
            "# one is older; the total cap above and the idle timeout hold, a firewall can add the rest\n"
            f"# (docs/sip.md: iptables -m connlimit --connlimit-above {TCP_CONNECTIONS_PER_SOURCE})\n")


def kamailio_version(kamailio: str) -> tuple[int, ...] | None:
    """kamailio's version from `kamailio -v` ("version: kamailio 5.6.3 (x86_64/linux)"), None if unreadable."""
    try:
        out = subprocess.run([kamailio, "-v"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version: kamailio (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


_MODULES = """\
####### Modules ########

mpath="%(modules)s"
"""


def _tls_params(edge: EdgeSettings) -> str:
    lines = ['loadmodule "tls.so"       # first: it sets OpenSSL up before any other module uses it',
             "",
             "# ----- tls: the system's OpenSSL 3; TLS 1.2 or newer only (sips: on this port)",
             'modparam("tls", "tls_method", "TLSv1.2+")',
             f'modparam("tls", "certificate", "{edge.cert_file}")',
             f'modparam("tls", "private_key", "{edge.key_file}")']
    if edge.ca_file:
        lines += ["# callers prove who they are with a certificate signed by this CA",
                  f'modparam("tls", "ca_list", "{edge.ca_file}")',
                  'modparam("tls", "verify_certificate", 1)',
                  'modparam("tls", "require_certificate", 1)']
    else:
        lines += ["# callers are not asked for a certificate (phones rarely have one)",
                  'modparam("tls", "verify_certificate", 0)',
                  'modparam("tls", "require_certificate", 0)']
    return "\n".join(lines) + "\n"


_PARAMS = """\
loadmodule "ctl.so"
loadmodule "counters.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "htable.so"
loadmodule "pike.so"
loadmodule "ipops.so"
loadmodule "dialog.so"
loadmodule "nathelper.so"

# ----- ctl: the control socket, for kamcmd -s unix:%(run_dir)s/kamailio_ctl
modparam("ctl", "binrpc", "unix:%(run_dir)s/kamailio_ctl")

# ----- tm: a 503 from serve (its model has no room, or no model service) is relayed as it is, with its
# Retry-After. tm's default turns a relayed 503 into a 500 (RFC 3261 16.7: nobody upstream should take
# this proxy for unavailable), and then an edge in front of this one (its [edge] nodes) would not try
# its next node, nor would a caller learn when to call again
modparam("tm", "remap_503_500", 0)

# ----- counters: what the edge stopped and passed (kamcmd ... cnt.get script <name>)
modparam("counters", "script_counter", "flood_sources")    # sources banned
modparam("counters", "script_counter", "flood_dropped")    # requests dropped from banned sources
modparam("counters", "script_counter", "malformed")        # refused by sanity checks
modparam("counters", "script_counter", "refused")          # methods we do not serve (405)
modparam("counters", "script_counter", "calls_limited")    # new calls above a rate (503)
modparam("counters", "script_counter", "calls_passed")     # new calls sent on to serve
modparam("counters", "script_counter", "calls_drained")    # new calls refused while shutting down (503)

# ----- pike and htable: a source sending more than %(density)d requests in %(unit)d s is banned; the ban
# (htable "banned") lasts until it has been quiet for %(ban)d s - pike alone would lift it after one
# calm %(unit)d s unit, and the flood would start again
modparam("pike", "sampling_time_unit", %(unit)d)
modparam("pike", "reqs_density_per_unit", %(density)d)
modparam("pike", "remove_latency", 4)
modparam("pike", "pike_log_level", 3)  # debug: route[FLOOD] logs each ban once itself
modparam("htable", "htable", "banned=>size=10;autoexpire=%(ban)d;initval=0;")
modparam("htable", "timer_interval", 2)  # s between sweeps of expired entries (20 would add up to 20 s to a ban)
# new calls per source and second ("<ip>::<second>"), and from everyone ("all::<second>")
modparam("htable", "htable", "calls=>size=10;autoexpire=3;initval=0;")
# "on" set to 1 while the edge drains before a shutdown (app/workers.py): new calls get 503
modparam("htable", "htable", "drain=>size=1;initval=0;")

# ----- sanity: answer 400 and hand the failure back to the script, which counts it
modparam("sanity", "autodrop", 0)

# ----- dialog: the calls we passed on, so that a request claiming to be in one can be checked, and
# how many each source has open ("caller" profile)
modparam("dialog", "profiles_with_value", "caller")
modparam("dialog", "default_timeout", 14400)  # s: forget a call that ended without a BYE through us

# ----- rr: our Record-Route keeps in-dialog requests on the edge; double when the caller's transport
# is not serve's (TLS or TCP outside, UDP inside)
modparam("rr", "enable_double_rr", 1)
"""

_MAIN = """\
####### Routing ########

request_route {
	# serve's own requests in its calls (BYE, re-INVITE, REFER, NOTIFY) go out unchecked
	if (%(from_serve)s) {
		route(FROM_SERVE);
	}
	route(REQINIT);
	# a CANCEL follows its INVITE's transaction, or goes nowhere
	if (is_method("CANCEL")) {
		if (t_check_trans()) {
			route(RELAY);
		}
		exit;
	}
	# retransmissions are absorbed by their transaction, not counted again below
	if (!is_method("ACK")) {
		if (t_precheck_trans()) {
			t_check_trans();
			exit;
		}
		t_check_trans();
	}
	if (has_totag()) {
		route(WITHINDLG);
	}
	route(NEW);
}

# Floods first (cheapest to drop), then what no SIP device should send
route[REQINIT] {
	route(FLOOD);
	if ($ua =~ "friendly-scanner|sipcli|sipvicious|sip-scan|VaxSIPUserAgent|pplsip") {
		# scanners get no answer: silence tells them nothing
		exit;
	}
	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	# RFC 3261's rules (headers present and parseable, CSeq, Content-Length, URIs, first Via,
	# duplicate tags); sanity answers 400 itself
	if (!sanity_check("24551", "7")) {
		cnt_inc("malformed");
		exit;
	}
	force_rport();  # answers go back where the request came from (callers behind NAT)
}
"""

_FLOOD = """\
# pike counts each source's requests: one above %(rps)d a second is banned, logged once, and dropped
# without an answer until it has been quiet for %(ban)d s
route[FLOOD] {
	if ($sht(banned=>$si) > 0) {
		# a banned source may still end the calls it has: dropping their ACK or BYE would hold
		# serve's lines (4 per process) until pjsua's timeouts
		if (has_totag() && is_method("ACK|BYE") && is_known_dlg()) {
			return;
		}
		$var(sent) = $shtinc(banned=>$si);  # what it sent; each drop extends the ban
		cnt_inc("flood_dropped");
		exit;
	}
	if (!pike_check_req()) {
		# atomic: of the workers that see the same flood at once, one logs and counts the ban
		if ($shtinc(banned=>$si) == 1) {
			xlog("L_WARN", "edge: flood from $si ($pr): dropped until it has been quiet for %(ban)d s\\n");
			cnt_inc("flood_sources");
		}
		cnt_inc("flood_dropped");
		exit;
	}
}
"""

_FLOOD_TRUSTED = _FLOOD.replace("route[FLOOD] {\n", """route[FLOOD] {
	if (is_in_subnet("$si", "%(trusted)s")) {
		return;  # trusted_sources: a trunk carries many callers from one address
	}
""")

_DIALOG_HEAD = """\
# Inside a dialog: only dialogs we set up (our Record-Route, known to the dialog module) are followed
route[WITHINDLG] {
	if (!loose_route()) {
		# the ACK of a refused INVITE belongs to our transaction, not to a dialog
		if (is_method("ACK")) {
			if (t_check_trans()) {
				route(RELAY);
			}
			exit;
		}
		sl_send_reply("404", "Not Here");
		exit;
	}
	if (!is_known_dlg()) {
		sl_send_reply("481", "Call/Transaction Does Not Exist");
		exit;
	}
	if (!is_method("INVITE|ACK|BYE|OPTIONS|REFER|INFO|NOTIFY|UPDATE|PRACK")) {
		route(REFUSE);
	}
	route(TO_SERVE_IN_DIALOG);
}
"""

_FIXED_IN_DIALOG = """\
# A caller's requests in its call go to serve, whatever their Request-URI says: the edge relays for
# nobody else. A sips: caller's name the edge itself (onreply_route[SIPS]), and the socket rr chose
# for the other leg is not serve's.
route[TO_SERVE_IN_DIALOG] {
	$du = "sip:%(buri)s:%(bport)d";
	if ($tU != $null) {
		$ru = "sip:" + $tU + "@%(buri)s:%(bport)d";
	} else {
		$ru = "sip:%(buri)s:%(bport)d";
	}
	force_send_socket(udp:%(inside)s:%(port)d);  # not the socket rr chose for the caller's side
	route(RELAY);
}
"""

_NEW = """\
# Outside a dialog only INVITE goes on; OPTIONS is answered here; the rest is refused
route[NEW] {
	if (is_method("OPTIONS")) {
		# keepalives and probes never reach serve
		append_to_reply("Allow: %(allowed)s\\r\\n");
		sl_send_reply("200", "OK");
		exit;
	}
	# REGISTER (we are no registrar), MESSAGE, SUBSCRIBE, PUBLISH, and REFER/INFO/NOTIFY/UPDATE
	# outside a dialog: serve keeps no state for any of them
	if (!is_method("INVITE")) {
		route(REFUSE);
	}
	if ($sht(drain=>on) > 0) {
		route(DRAINING);
	}
	route(LIMITS);
	dlg_manage();
	%(keepalive_on)sset_dlg_profile("caller", "$si");
	if (nat_uac_test("19")) {
		fix_nated_contact();  # the caller's Contact names a private address: use where it came from
	}
	cnt_inc("calls_passed");
	route(TO_SERVE);
}

# shutting down (`kamcmd htable.seti drain on 1`): the calls in progress go on, new ones go elsewhere
route[DRAINING] {
	cnt_inc("calls_drained");
	append_to_reply("Retry-After: %(drain_retry)d\\r\\n");
	sl_send_reply("503", "Shutting Down");
	exit;
}

# 405 naming what we take (RFC 3261 wants the Allow header in it)
route[REFUSE] {
	cnt_inc("refused");
	append_to_reply("Allow: %(allowed)s\\r\\n");
	sl_send_reply("405", "Method Not Allowed");
	exit;
}
"""

_PER_SOURCE_LIMITS = """\
	if ($shtinc(calls=>$si::$Ts) > %(cps)d) {
		route(BUSY);
	}
	if (get_profile_size("caller", "$si", "$var(open)") && $var(open) >= %(open)d) {
		route(BUSY);
	}
"""


def _limits(edge: EdgeSettings, v: dict) -> str:
    per_source = _PER_SOURCE_LIMITS % v
    if edge.trusted_sources:
        inner = "".join("\t" + line if line.strip() else line for line in per_source.splitlines(True))
        per_source = ("\t# trusted_sources skip these: a trunk carries many callers from one address\n"
                      f"\tif (!is_in_subnet(\"$si\", \"{v['trusted']}\")) {{\n{inner}\t}}\n")
    return (_LIMITS_HEAD % v) + per_source + (_LIMITS_TAIL % v)


_LIMITS_HEAD = """\
# New calls: %(cps)d a second and %(open)d open at once per source, %(total)d a second from everyone together
# (serve's pjsua2 aborts when it refuses ~33 INVITEs in half a second); the rest are told to come back
route[LIMITS] {
"""

_LIMITS_TAIL = """\
	if ($shtinc(calls=>all::$Ts) > %(total)d) {
		route(BUSY);
	}
}

# 503 with a time to come back after
route[BUSY] {
	cnt_inc("calls_limited");
	append_to_reply("Retry-After: 5\\r\\n");
	sl_send_reply("503", "Too Many Calls");
	exit;
}
"""

_TO_SERVE = """\
# Where calls go: one serve, a fixed destination (several - `serve --workers`, [edge] nodes - are
# dispatched: that configuration loads the dispatcher module and picks one with ds_select_dst)
route[TO_SERVE] {
	if ($rz == "sips") {
		# the edge's own sips: address, for the Contact of serve's answers (onreply_route[SIPS])
		if ($rU != $null) {
			$avp(sips_contact) = "sips:" + $rU + "@" + $RAi + ":" + $RAp;
		} else {
			$avp(sips_contact) = "sips:" + $RAi + ":" + $RAp;
		}
		t_on_reply("SIPS");
	}
	$du = "sip:%(buri)s:%(bport)d";
	force_send_socket(udp:%(inside)s:%(port)d);  # serve's side of the edge (a loopback source)
	# serve takes sip: over UDP: a sips: call's TLS ended here, its last hop is loopback
	if ($rU != $null) {
		$ru = "sip:" + $rU + "@%(buri)s:%(bport)d";
	} else {
		$ru = "sip:%(buri)s:%(bport)d";
	}
	# after the sip: Request-URI: rr takes our Record-Route's scheme from it, and serve has no TLS to
	# follow a sips: one
	record_route();
	t_set_fr(0, 4000);  # ms without any answer: serve answers 100 Trying at once, silence means it is down
	t_on_failure("SERVE_FAILED");
	route(RELAY);
}
"""

_SIPS_REPLY = """\
# serve's Contact is a sip: URI on loopback; a sips: caller requires a sips: one (RFC 5630: pjsua
# hangs up with "480 SIPS Required") and should learn no address but the edge's. The same for our
# Record-Route (both entries: pjsua wants its whole route set sips:): rr wrote sip:, as serve needs.
onreply_route[SIPS] {
	if (is_present_hf("Contact")) {
		remove_hf("Contact");
		append_hf("Contact: <$avp(sips_contact)>\\r\\n");
	}
	subst_hf("Record-Route", "/<sip:/<sips:/g", "a");
}
"""

_SERVE_FAILED = """\
# serve did not answer at all: the caller hears the service is down, not 408
failure_route[SERVE_FAILED] {
	if (t_is_canceled()) {
		exit;
	}
	if (t_branch_timeout() && !t_branch_replied()) {
		t_reply("503", "Service Unavailable");
	}
}
"""

_DISPATCHER_PARAMS = """\
loadmodule "dispatcher.so"

# ----- dispatcher: serve's destinations, set %(set)d in %(run_dir)s/dispatcher.list (below), each asked
# OPTIONS every %(ping)d s: %(ping_failures)d unanswered in a row take it out, one answer brings it back
modparam("dispatcher", "list_file", "%(run_dir)s/dispatcher.list")
modparam("dispatcher", "flags", 2)  # the rest of the set kept for ds_next_dst()
modparam("dispatcher", "ds_ping_method", "OPTIONS")
modparam("dispatcher", "ds_ping_from", "sip:edge@localhost")
modparam("dispatcher", "ds_ping_interval", %(ping)d)
modparam("dispatcher", "ds_probing_mode", 1)  # ping all of them, the active ones too
modparam("dispatcher", "ds_probing_threshold", %(ping_failures)d)
modparam("dispatcher", "ds_inactive_threshold", 1)
modparam("dispatcher", "reload_delta", 1)
# a ping (like any request but an INVITE) with no answer fails after %(ping_timeout)d s, not tm's 30: a
# destination that went quiet is out in about %(ping_timeout)d + %(ping_failures)d x %(ping)d s
modparam("tm", "fr_timer", %(ping_timeout_ms)d)
# dispatcher.list:
"""

_TM_TIMEOUT = """\
# ----- tm: a request other than an INVITE with no answer at all fails after %(ping_timeout)d s, not tm's 30 (a
# dialog keep-alive to a serve that stopped fails that soon; serve and trunks answer within milliseconds)
modparam("tm", "fr_timer", %(ping_timeout_ms)d)
"""

_KEEPALIVE_PARAMS = """\
# ----- dialog keep-alive ([edge] dialog_keepalive_s): every %(keepalive)d s each side of a call through us gets an
# OPTIONS in its dialog; unanswered (408, after tm's fr_timer) or unknown (481) once, the dialog's lifetime
# becomes 10 s and at its end the edge sends BYE to both sides: a caller whose serve, worker or machine
# stopped dead is hung up (no BYE can come from a stopped process), one that vanished frees its slot
modparam("dialog", "ka_timer", 1)
modparam("dialog", "ka_interval", %(keepalive)d)
modparam("dialog", "ka_failed_limit", 1)
modparam("dialog", "send_bye", 1)
"""

_DISPATCH_IN_DIALOG = """\
# A caller's requests in its call go to the destination that took it (kept with the dialog), whatever
# their Request-URI says: the edge relays for nobody else. A sips: caller's name the edge itself
# (onreply_route[SIPS]), and the socket rr chose for the other leg is not serve's.
route[TO_SERVE_IN_DIALOG] {
	if ($dlg_var(serve) == $null) {
		sl_send_reply("481", "Call/Transaction Does Not Exist");
		exit;
	}
	$du = $dlg_var(serve);
	route(SERVE_RURI);
	route(SERVE_SOCKET);
	route(RELAY);
}

# serve takes sip: over UDP at the destination's address: a sips: call's TLS ended here
route[SERVE_RURI] {
	if ($rU != $null) {
		$ru = "sip:" + $rU + "@" + $dd + ":" + $dp;
	} else {
		$ru = "sip:" + $dd + ":" + $dp;
	}
}
"""

_DISPATCH = """\
# Where calls go: one of dispatcher set %(set)d (dispatcher.list above), in turn among those that answer
# their pings; none: 503 and a time to come back
route[TO_SERVE] {
	if ($rz == "sips") {
		# the edge's own sips: address, for the Contact of serve's answers (onreply_route[SIPS])
		if ($rU != $null) {
			$avp(sips_contact) = "sips:" + $rU + "@" + $RAi + ":" + $RAp;
		} else {
			$avp(sips_contact) = "sips:" + $RAi + ":" + $RAp;
		}
		t_on_reply("SIPS");
	}
	if (!ds_select_dst("%(set)d", "4")) {
		append_to_reply("Retry-After: 5\\r\\n");
		sl_send_reply("503", "No Serve Available");
		exit;
	}
	route(TO_DESTINATION);
	# after the sip: Request-URI: rr takes our Record-Route's scheme from it, and serve has no TLS to
	# follow a sips: one
	record_route();
	t_on_failure("SERVE_FAILED");
	route(RELAY);
}

# The destination chosen ($du): its socket and Request-URI, and the dialog remembers it for the call's
# later requests (the last one tried is the one that answered)
route[TO_DESTINATION] {
	route(SERVE_SOCKET);
	route(SERVE_RURI);
	$dlg_var(serve) = $du;
	t_set_fr(0, 4000);  # ms without any answer: serve answers 100 Trying at once, silence means it is down
}
"""

_DISPATCH_FAILED = """\
# serve refused (486: its 4 lines are taken; 503: its model has no room) or did not answer at all
# (out of the set until it answers a ping): the next destination; none left, the caller gets the
# refusal, or 503 rather than 408
failure_route[SERVE_FAILED] {
	if (t_is_canceled()) {
		exit;
	}
	if (t_branch_timeout() && !t_branch_replied()) {
		xlog("L_WARN", "edge: $xavp(_dsdst_=>uri) did not answer an INVITE: out until it answers a ping\\n");
		ds_mark_dst("ip");
	} else if (!t_check_status("486|503")) {
		exit;
	}
	if (ds_next_dst()) {
		route(TO_DESTINATION);
		t_on_failure("SERVE_FAILED");
		route(RELAY);
	}
	if (t_branch_timeout() && !t_branch_replied()) {
		t_reply("503", "Service Unavailable");
	}
}
"""

_FROM_SERVE = """\
# Serve's requests: inside its calls (our Record-Route), and the calls it places (`callbot call
# --edge`: an INVITE through its proxy, the edge), which go where their Request-URI says
route[FROM_SERVE] {
	if (has_totag() && loose_route()) {
		route(RELAY);
	}
	if (is_method("ACK|CANCEL") && t_check_trans()) {
		route(RELAY);
	}
	if (is_method("INVITE") && !has_totag()) {
		route(OUTBOUND);
	}
	sl_send_reply("403", "Not Relaying");
	exit;
}

# A call serve places: our own Route entry (serve's proxy) taken off, the dialog known (the callee's
# requests in it are let in, and go to serve), Record-Route so that they come through here
route[OUTBOUND] {
	loose_route();
	if ($rz == "sips" || $rP == "tls") {
		# rr would give serve a sips: route entry, and serve has no TLS to follow it
		sl_send_reply("416", "Unsupported URI Scheme");
		exit;
	}
	if (uri == myself) {
		# to the edge's own address: it would come back to serve as a call from outside
		sl_send_reply("482", "Loop Detected");
		exit;
	}
	dlg_manage();
	%(keepalive_on)s
%(outbound_socket)s	record_route();
	route(RELAY);
}

# statefully: retransmissions and the CANCEL find their transaction
route[RELAY] {
	if (!t_relay()) {
		sl_reply_error();
	}
	exit;
}
"""


def check_config(kamailio: str, path: str | os.PathLike) -> None:
    """`kamailio -c -f PATH`; StartupError with kamailio's own complaint when it refuses the file."""
    out = subprocess.run([kamailio, "-c", "-f", os.fspath(path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        errors = [l.strip() for l in (out.stderr + out.stdout).splitlines() if "ERROR" in l or "CRITICAL" in l]
        raise StartupError(f"kamailio refused the edge configuration {os.fspath(path)}: "
                           f"{errors[0] if errors else out.stderr.strip()[-300:]}")


# ---------------------------------------------------------------------------------------------------
# running it


def _probe_address(edge: EdgeSettings) -> str:
    return "127.0.0.1" if edge.address == "0.0.0.0" else edge.address


def _answers_options(host: str, port: int, timeout: float) -> bool:
    """Whether an OPTIONS sent over UDP gets an answer (the edge answers OPTIONS itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # the source address the kernel picks towards it, for our Via
        s.settimeout(timeout)
        me = s.getsockname()
        via = f"[{me[0]}]:{me[1]}" if family == socket.AF_INET6 else f"{me[0]}:{me[1]}"
        target = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        msg = (f"OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK-ready-{time.monotonic_ns()}\r\n"
               f"From: <sip:ready@{via}>;tag=ready\r\nTo: <sip:{target}>\r\nCall-ID: ready-{os.getpid()}\r\n"
               f"CSeq: 1 OPTIONS\r\nMax-Forwards: 5\r\nContent-Length: 0\r\n\r\n")
        s.send(msg.encode())
        try:
            return s.recv(4096).startswith(b"SIP/2.0 200")
        except OSError:
            return False


def _death_signal() -> Callable[[], None] | None:
    """For the child before exec (Linux): SIGTERM when callbot dies, even by SIGKILL, so that no kamailio
    is left holding the public port. prctl is looked up here, in the parent: the child of a threaded
    process should run as little as possible before exec. macOS has no such call: there
    watch_for_orphan does the same from a process of its own."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    args = (ctypes.c_int(1), ctypes.c_ulong(signal.SIGTERM))  # PR_SET_PDEATHSIG

    def set_death_signal() -> None:
        prctl(*args)

    return set_death_signal


# the watcher's program: it polls its parent (callbot); once reparented (callbot died, even by SIGKILL) it
# sends SIGTERM to kamailio's process group. A callbot gone before the first look is seen at once.
_ORPHAN_WATCH = """\
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.2)
try:
    os.killpg(group, signal.SIGTERM)
except OSError:
    pass
"""


def watch_for_orphan(group: int) -> subprocess.Popen:
    """The parent-death signal's twin where there is no prctl (macOS): a small process of ours, in its own
    session (a Ctrl-C in the terminal does not end it), that sends SIGTERM to process group `group` (kamailio
    leads its own) within 0.2 s of this process's death. POSIX reparents an orphan (to launchd on macOS),
    so its parent id changes. `Edge.stop` ends it first on a normal stop."""
    return subprocess.Popen([sys.executable, "-c", _ORPHAN_WATCH, str(os.getpid()), str(group)],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def preflight(edge: EdgeSettings) -> tuple[str, str]:
    """Everything the edge needs before anything starts: (kamailio's path, its modules folder)."""
    kamailio = find_kamailio(edge)
    modules_dir = find_modules_dir(edge, kamailio)
    if edge.tls and not has_module(modules_dir, "tls"):
        raise StartupError(NO_TLS_MODULE.format(dirs=modules_dir))
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(edge, name)
        if path is not None and not os.path.isfile(path):
            raise StartupError(f"$.edge.{name}: {path!r} does not exist")
    return kamailio, modules_dir


class Edge:
    """kamailio running the generated configuration, a child of this process."""

    def __init__(self, settings: Settings, backend: Backend | Sequence[Backend], *, source: str = "callbot's config",
                 dispatch: bool | None = None):
        self.settings = settings
        self.edge = settings.edge
        self.destinations = destinations(self.edge, backend)
        self.backend = self.destinations[0]
        self.dispatch = len(self.destinations) > 1 if dispatch is None else dispatch
        self.kamailio, self.modules_dir = preflight(self.edge)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.edge.run_dir:
            self.run_dir = pathlib.Path(self.edge.run_dir)
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StartupError(f"$.edge.run_dir {os.fspath(self.run_dir)!r}: cannot create it ({err.strerror})") from None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="callbot-edge-")
            self.run_dir = pathlib.Path(self._tmp.name)
        self.config_path = self.run_dir / "kamailio.cfg"
        config = render(self.edge, self.destinations, modules_dir=self.modules_dir, run_dir=os.fspath(self.run_dir),
                        source=source, version=kamailio_version(self.kamailio), dispatch=self.dispatch)
        try:
            if self.dispatch:
                (self.run_dir / "dispatcher.list").write_text(dispatcher_list(self.edge, self.destinations))
            self.config_path.write_text(config)
        except OSError as err:  # a full disk, a folder that is not ours
            if self._tmp is not None:
                self._tmp.cleanup()
            raise StartupError(f"kamailio's files in {os.fspath(self.run_dir)!r}: cannot write them "
                               f"({err.strerror or err})") from None
        self.proc: subprocess.Popen | None = None
        self._group_ended = False  # stop() has killed what was left of kamailio's process group
        self._watcher: subprocess.Popen | None = None

    @property
    def ctl_socket(self) -> str:
        return f"unix:{self.run_dir / 'kamailio_ctl'}"

    def describe(self) -> str:
        """The one line `callbot edge` and `serve --edge` print at start."""
        e = self.edge
        public = f"udp/tcp {e.address}:{e.port}" + (f", tls {e.address}:{e.tls_port}" if e.tls else "")
        to = ", ".join(map(str, self.destinations))
        return f"edge: kamailio on {public} -> serve at {to} (config {self.config_path})"

    def start(self) -> Edge:
        check_config(self.kamailio, self.config_path)
        args = [self.kamailio, "-f", os.fspath(self.config_path), "-P", os.fspath(self.run_dir / "kamailio.pid"),
                "-Y", os.fspath(self.run_dir), "-DD", "-E"]
        if self.edge.tls:
            # libssl 1.1+ frees shared memory in atexit handlers that kamailio's children still use
            # (the tls module's README): skip them
            args.append("--atexit=no")
        # its own session: a Ctrl-C in the terminal reaches callbot, which stops kamailio in order
        death_signal = _death_signal()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=death_signal)
        if death_signal is None:
            self._watcher = watch_for_orphan(self.proc.pid)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _answers_options(_probe_address(self.edge), self.edge.port, 0.2):
            if self.proc.poll() is not None:
                raise StartupError(f"kamailio exited with status {self.proc.returncode} at start (its log is "
                                   "above; is the port taken?)")
            if time.monotonic() > deadline:
                self.stop()
                raise StartupError(f"kamailio did not answer on port {self.edge.port} within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)  # not bound yet (port unreachable comes back at once)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        if self._watcher is not None:
            self._watcher.terminate()
            self._watcher.wait(timeout)
            self._watcher = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its children too
                self.proc.wait(timeout)
        if self.proc is not None and not self._group_ended:
            # kamailio's own session: a child its main left behind on the way out (seen in a test run: three
            # children outlived a main that had said goodbye, and ignored SIGTERM) must not keep the port.
            # Once only: a later stop() must not signal a group whose id a new process may have taken.
            self._group_ended = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return None if self.proc is None else self.proc.returncode

    def counters(self) -> dict[str, int]:
        return read_counters(self.ctl_socket, self.kamailio)

    def rpc(self, *args: str) -> str:
        """One kamcmd command over the control socket; its output. RuntimeError when it fails."""
        return kamcmd(self.ctl_socket, self.kamailio, *args)

    def set_state(self, dest: Backend | str, state: str) -> None:
        """A destination's dispatcher state: "ap" in, "ip" out until it answers a ping, "d" out for good;
        `dest` "all": every one."""
        self.rpc("dispatcher.set_state", state, str(DISPATCH_SET), dest if isinstance(dest, str) else dest.uri)

    def states(self) -> dict[str, str]:
        return dispatcher_states(self.ctl_socket, self.kamailio)

    def drain(self) -> None:
        """New calls get 503 (Retry-After) from now on; the calls in progress and their requests go on."""
        self.rpc("htable.seti", "drain", "on", "1")

    def drain_calls(self, limit_s: float, cut_short: Callable[[], bool], say: Callable[[str], None],
                    tend: Callable[[], None] = lambda: None, wake: threading.Event | None = None) -> int:
        """A drained stop's wait: new calls get 503 from now on, and this returns once no call is left or
        `limit_s` has passed or `cut_short()` (a second signal); the calls still in progress. `tend` runs
        between looks (the supervisor keeps its workers), `wake` ends a look early."""
        try:
            self.drain()
            calls = self.active_calls()
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            say(f"callbot: the edge could not be drained ({err}): stopping now")
            return 0
        say(f"callbot: draining: new calls get 503; {calls} in progress, waiting up to {limit_s:g} s "
            "(a second SIGTERM/SIGINT stops now)")
        deadline = time.monotonic() + limit_s
        wake = wake or threading.Event()
        while calls > 0 and time.monotonic() < deadline and not cut_short():
            tend()
            wake.wait(0.2)
            wake.clear()
            try:
                calls = self.active_calls()
            except (RuntimeError, OSError, subprocess.SubprocessError):
                break
        say("callbot: drained: stopping" if calls == 0 else
            f"callbot: {calls} calls still in progress after {limit_s:g} s: they are hung up")
        return calls

    def hang_up_leftovers(self, say: Callable[[str], None], wait_s: float = PING_TIMEOUT_S + 1.0) -> int:
        """After what served the calls has stopped, before kamailio does: any answered call still passing
        through the edge (a worker killed before its BYE, a BYE lost) is ended by the edge itself (kamailio's
        dlg.end_dlg: a BYE to both sides); then up to `wait_s` until the dialog module holds no dialog, so
        that the BYEs in flight, ours and serve's, get their answers (tm retransmits until then: stopped
        sooner, a BYE lost on the way is never sent again and that caller hears silence). The calls ended
        here."""
        try:
            left = [(entry, ident) for entry, ident, state in self._dialogs() if state in DIALOG_ANSWERED]
            for entry, ident in left:
                with contextlib.suppress(RuntimeError):  # one that ended meanwhile
                    self.rpc("dlg.end_dlg", entry, ident)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            say(f"callbot: the edge could not hang up the calls left ({err})")
            return 0
        if left:
            say(f"callbot: {len(left)} calls left at the edge after their server stopped: hung up by the edge")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if not self._dialogs():
                    break
            except (RuntimeError, OSError, subprocess.SubprocessError):
                break
            time.sleep(0.1)
        return len(left)

    def _dialogs(self) -> list[tuple[str, str, str]]:
        """(h_entry, h_id, state) of each dialog the dialog module holds, in any state."""
        found: list[tuple[str, str, str]] = []
        entry = ident = None
        for line in self.rpc("dlg.list").splitlines():
            key, _, value = line.strip().partition(":")
            key, value = key.strip(), value.strip()
            if key == "h_entry":
                entry, ident = value, None
            elif key == "h_id":
                ident = value
            elif key == "state" and entry is not None and ident is not None:
                found.append((entry, ident, value))
                entry = ident = None
        return found

    def active_calls(self) -> int:
        """The calls passing through the edge now, ringing or answered (the dialog module's count)."""
        for line in self.rpc("dlg.stats_active").splitlines():
            key, _, value = line.strip().partition(":")
            if key == "all":
                return int(value)
        raise RuntimeError("kamcmd dlg.stats_active: no 'all' count")


def dispatcher_states(ctl_socket: str, kamailio: str | None = None) -> dict[str, str]:
    """Each destination's dispatcher flags by URI ("AP": in and pinged, "TP": a ping missed, "IP": out
    until it answers one, "DX": disabled), from kamcmd dispatcher.list."""
    found, uri = {}, None
    for line in kamcmd(ctl_socket, kamailio, "dispatcher.list").splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "URI":
            uri = value
        elif key == "FLAGS" and uri is not None:
            found[uri] = value
            uri = None
    return found


def kamcmd(ctl_socket: str, kamailio: str | None, *args: str) -> str:
    """kamcmd (installed with kamailio) ARGS over `ctl_socket`; its output. RuntimeError when it fails."""
    search = os.pathsep.join(p for p in (os.path.dirname(kamailio or ""), os.environ.get("PATH", "")) if p)
    program = shutil.which("kamcmd", path=search)
    if program is None:
        raise RuntimeError("kamcmd (kamailio's control client) is not installed")
    out = subprocess.run([program, "-s", ctl_socket, *args], capture_output=True, text=True, timeout=10)
    if out.returncode != 0 or out.stdout.startswith("error:"):
        raise RuntimeError(f"kamcmd {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def read_counters(ctl_socket: str, kamailio: str | None = None) -> dict[str, int]:
    """The configuration's COUNTERS, read over kamailio's control socket with kamcmd (installed with it)."""
    values = {}
    for line in kamcmd(ctl_socket, kamailio, "cnt.grp_get_all", "script").splitlines():
        name, _, value = line.strip().partition(":")
        if name.strip() in COUNTERS:
            values[name.strip()] = int(value)
    return values


@dataclass
class Signals:
    """SIGTERM/SIGINT for a drained stop: the first sets `stop`, a second cuts the drain short."""

    stop: threading.Event
    wake: threading.Event
    count: int = 0


@contextlib.contextmanager
def drain_signals() -> Iterator[Signals]:
    """Signals while inside (the handlers run on the main thread between bytecodes)."""
    sig = Signals(threading.Event(), threading.Event())

    def handler(*_) -> None:
        sig.count += 1
        sig.stop.set()
        sig.wake.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def running_edge(settings: Settings, backend: Backend | Sequence[Backend], *, source: str = "callbot's config",
                 dispatch: bool | None = None) -> Iterator[Edge]:
    edge = Edge(settings, backend, source=source, dispatch=dispatch)
    try:
        yield edge.start()
    finally:
        edge.stop()


def run_edge(settings: Settings, *, source: str, print_only: bool = False, check_only: bool = False) -> int:
    """`callbot edge`: kamailio alone in front of a serve started separately (or `[edge] nodes`); until
    SIGTERM/SIGINT, then a drain: new calls get 503 while those in progress go on, up to `[edge] drain_s`
    (a second signal stops at once)."""
    # with [edge] nodes they are where calls go; else serve on loopback, as its config says
    if settings.edge.nodes:
        check_edge(settings.edge)
        backend: list[Backend] = []
    else:
        backend = [backend_of(settings)]
    if print_only:
        # text only: kamailio need not be installed here (the config may be meant for another machine)
        installed = shutil.which(settings.edge.kamailio)
        try:
            modules_dir = find_modules_dir(settings.edge, installed)
        except StartupError:
            modules_dir = "/usr/lib/x86_64-linux-gnu/kamailio/modules"  # Debian's; set [edge] modules_dir
        sys.stdout.write(render(settings.edge, backend, modules_dir=modules_dir,
                                run_dir=settings.edge.run_dir or "/run/callbot-edge", source=source,
                                version=kamailio_version(installed) if installed else None))
        return 0
    edge = Edge(settings, backend, source=source)
    if check_only:
        try:
            check_config(edge.kamailio, edge.config_path)
        finally:
            edge.stop()
        say("edge: kamailio -c accepts the generated configuration")
        return 0
    with drain_signals() as sig:
        try:
            edge.start()
            say(edge.describe())
            while not sig.stop.is_set():
                if edge.proc.poll() is not None:
                    say(f"callbot: error: kamailio exited with status {edge.proc.returncode}")
                    return 1
                sig.stop.wait(0.2)
            edge.drain_calls(settings.edge.drain_s, lambda: sig.count >= 2, say, wake=sig.wake)
            edge.hang_up_leftovers(say)  # past drain_s
        finally:
            edge.stop()
    return 0


def serve_with_edge(settings: Settings, engine_kind: str, *, source: str = "callbot's config") -> int:
    """`callbot serve --edge`: serve on loopback, then kamailio in front of it. At the stop the edge refuses
    new calls first, serve hangs up its calls through it, the edge hangs up any it still holds, and then
    kamailio stops (stopped first, serve's BYEs would have no way to the callers)."""
    from callbot.app.serve import EXIT_SERVER_FAILURE, ServerFailure, running_server, stop_on_signals

    settings = serve_settings(settings)
    preflight(settings.edge)  # before anything starts: a missing kamailio is one line and exit 2
    with stop_on_signals() as stop, running_server(settings, engine_kind) as server:
        i, t = _serve_transport(settings)
        bound = server.endpoint.transports[t.name]
        backend = Backend("127.0.0.1" if t.bind == "localhost" else t.bind, bound.port)
        with running_edge(settings, backend, source=source) as edge:
            for name in server.endpoint.accounts:
                say(f"listening {server.endpoint.account_uri(name)} ({engine_kind})")
            say(edge.describe())
            died: list[int] = []

            def watch() -> None:
                died.append(edge.proc.wait())
                stop.set()

            threading.Thread(target=watch, name="edge-watch", daemon=True).start()
            try:
                server.pump(stop=stop)
            except ServerFailure as err:
                say(f"callbot: error: {err}; shutting down")
                return EXIT_SERVER_FAILURE
            finally:
                if not died:
                    _hang_up_through(edge, server.endpoint)
            if died:  # kamailio runs in its own session: no signal of ours stopped it
                say(f"callbot: error: kamailio (the edge) exited with status {died[0]}; shutting down")
                return EXIT_SERVER_FAILURE
    return 0


def _hang_up_through(edge: Edge, endpoint) -> None:
    """serve's calls hung up while its edge still relays their BYEs: new calls refused (503), the endpoint
    stopped (its BYEs), then whatever the edge still holds ended by the edge."""
    try:
        edge.drain()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        say(f"callbot: the edge could not refuse new calls ({err})")
    try:
        endpoint.stop()
    except (RuntimeError, TimeoutError) as err:
        say(f"callbot: the SIP endpoint did not stop cleanly: {err}")
    edge.hang_up_leftovers(say)


def call_with_edge(settings: Settings, engine_kind: str, uri: str, *, account: str | None, bot: str | None,
                   source: str = "callbot's config") -> int:
    """`callbot call --edge`: one call placed from loopback through kamailio, which relays it from the
    public side (route[OUTBOUND]) and keeps the callee's requests in the call coming back through it.
    kamailio starts first: its configuration names serve's port, so a port 0 in the config becomes a
    free one chosen here. Another edge on the same public port (a running `serve --edge`) makes this
    one fail to start: stop that serve, or place calls from it."""
    from callbot.app.serve import call

    settings = serve_settings(settings)
    preflight(settings.edge)
    i, t = _serve_transport(settings)
    host = "127.0.0.1" if t.bind == "localhost" else t.bind
    if t.port == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]  # free now; pjsua binds it a moment later
        transports = list(settings.sip.transports)
        transports[i] = msgspec.structs.replace(t, port=port)
        settings = msgspec.structs.replace(settings, sip=msgspec.structs.replace(settings.sip,
                                                                                  transports=tuple(transports)))
    backend = backend_of(settings)
    with running_edge(settings, backend, source=source) as edge:
        say(edge.describe())
        return call(settings, engine_kind, uri, account=account, bot=bot)
