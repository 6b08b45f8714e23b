"""Who may hand us an INVITE, and how often: per-source and process-wide limits, and what a refusal costs.

Why: the wheel has 4 call slots and 64 ioqueue handles (docs/architecture.md, "The wheel's limits"). An
INVITE that pjsua takes up opens media sockets before our code sees it; a flood of them aborts the process,
and four answered INVITEs that are never ACKed hold every slot. This module is the policy; sip/gate.py
applies it to each request before pjsua does anything with it, and sip/call.py reports answered INVITEs
whose ACK never came. Plain Python, no pjsua2: one instance per endpoint, used on its SIP thread only.

- A source (an IP address: ports cost an attacker nothing) gets `invite_rate_per_source` INVITEs per second
  with bursts of `invite_burst_per_source`; more are answered 503 with Retry-After (slowed down).
- A source that leaves `unacked_limit` answered INVITEs without ACK within `unacked_window_s` is refused
  for `block_s` (503, Retry-After the time left).
- All sources together hand pjsua at most `invite_rate_total` INVITEs per second (burst
  `invite_burst_total`): what the 64 handles take (BENCHMARKS.md "SIP floods"), whoever sends.
- Sources that carry many callers (`exempt_sources`: by default this machine's loopback address, where
  the edge reaches serve from; accounts' trusted sources) have no rate of their own and are never blocked.
- Every refusal is counted by reason; each source is reported (one log line, one event) at its first
  refusal and then at most once a minute with what it was refused since.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import math
from dataclasses import dataclass, field

from .config import AdmissionConfig

log = logging.getLogger(__name__)

REPORT_EVERY_S = 60.0  # a refused source is logged (and reported as an event) at most this often
SOURCES_KEPT = 4096  # per-source state kept (a spoofed flood brings new sources without end): LRU beyond
# reports (log lines, events) of single sources, all together: a spoofed flood brings a new source with
# every packet; beyond this, sources are summed up in one report per sweep
REPORTS_PER_S, REPORTS_BURST = 2.0, 20

# why a request was refused: the counters' labels (Prometheus) and the log's words
RATE = "rate"  # the source's INVITEs came faster than invite_rate_per_source
BLOCKED = "blocked"  # the source left answered INVITEs unacknowledged
OVERLOAD = "overload"  # all sources together: more INVITEs than invite_rate_total
UNACKED = "unacked"  # an answered INVITE whose ACK never came (the call was hung up)
UNTRUSTED = "untrusted"  # 403: no account takes INVITEs from this source
OFFER = "offer"  # 488: an offer we cannot answer, or no offer where none is accepted
NOT_SERVED = "not_served"  # 405: a method we do not serve (MESSAGE, SUBSCRIBE, PUBLISH, REGISTER, REFER)
UNKNOWN_METHOD = "unknown_method"  # 501
NO_DIALOG = "no_dialog"  # 481: an in-dialog request for no dialog of ours

_WHY = {RATE: "INVITEs over {rate:g}/s (503)", BLOCKED: "INVITEs while blocked (503)",
        OVERLOAD: "INVITEs with the process's intake of {total:g}/s full (503)",
        UNACKED: "answered INVITEs never ACKed (hung up)", UNTRUSTED: "INVITEs no account trusts (403)",
        OFFER: "INVITEs with an offer we do not take (488)", NOT_SERVED: "requests of a method we do not serve (405)",
        UNKNOWN_METHOD: "requests of an unknown method (501)", NO_DIALOG: "requests for no dialog of ours (481)"}


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; a request takes one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), now

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self._fill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until the next token."""
        self._fill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def full(self, now: float) -> bool:
        self._fill(now)
        return self.tokens >= self.burst


@dataclass
class Refusal:
    """Why an INVITE is not handed on: the answer (503) and its Retry-After in whole seconds."""

    reason: str
    retry_after_s: int
    code: int = 503


@dataclass
class Report:
    """What a source was refused since its last report; the log line and the event say it."""

    source: str  # an IP address, or "N sources" for the sum over sources beyond the report budget
    counts: dict[str, int]
    first: bool  # the source's first refusal (or the first after a quiet minute)
    blocked_for_s: float = 0.0

    def message(self, cfg: AdmissionConfig) -> str:
        kinds = ", ".join(f"{n} {_WHY[k].format(rate=cfg.invite_rate_per_source, total=cfg.invite_rate_total)}"
                          for k, n in sorted(self.counts.items()))
        blocked = f"; blocked for {self.blocked_for_s:.0f} s more" if self.blocked_for_s > 0 else ""
        who = f"SIP {self.source}" if self.source.endswith(" sources") else f"SIP source {self.source}"
        if self.first:
            return f"{who}: {kinds}{blocked} (counted from now on, reported at most once a minute)"
        return f"{who}, the last minute: {kinds}{blocked}"


@dataclass
class _Source:
    bucket: TokenBucket
    unacked: collections.deque = field(default_factory=collections.deque)  # when answered INVITEs went unACKed
    blocked_until: float = -math.inf
    pending: dict[str, int] = field(default_factory=dict)  # refusals not reported yet
    reported_at: float = -math.inf


class Admission:
    """The policy of one endpoint (SIP thread only). `counts` holds every refusal since start, by reason."""

    def __init__(self, cfg: AdmissionConfig, now: float, exempt: tuple[str, ...] = ()):
        self.cfg = cfg
        self._exempt = [ipaddress.ip_network(e, strict=False) for e in cfg.exempt_sources + tuple(exempt)]
        self._exempt_seen: dict[str, bool] = {}
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()
        self._total = TokenBucket(cfg.invite_rate_total, cfg.invite_burst_total, now)
        self.counts: dict[str, int] = collections.Counter()
        self.admitted = 0  # INVITEs handed on to pjsua
        self._reports = TokenBucket(REPORTS_PER_S, REPORTS_BURST, now)
        self._unreported: collections.Counter[str] = collections.Counter()  # over the report budget, evicted
        self._unreported_sources = 0

    # ---- decisions

    def exempt(self, source: str) -> bool:
        """Whether `source` (an IP address) carries many callers: no rate of its own, never blocked."""
        known = self._exempt_seen.get(source)
        if known is None:
            try:
                ip = ipaddress.ip_address(source)
                known = any(ip in net for net in self._exempt)
            except ValueError:
                known = False
            if len(self._exempt_seen) >= SOURCES_KEPT:
                self._exempt_seen.clear()
            self._exempt_seen[source] = known
        return known

    def blocked(self, source: str, now: float) -> Refusal | None:
        """A refusal while `source` is blocked (it left answered INVITEs unacknowledged), else None."""
        src = self._sources.get(source)
        if src is not None and src.blocked_until > now:
            self._sources.move_to_end(source)
            return Refusal(BLOCKED, max(1, math.ceil(src.blocked_until - now)))
        return None

    def check_invite(self, source: str, now: float) -> Refusal | None:
        """The per-source verdict on a new INVITE from `source` (an IP address): None = go on."""
        if self.exempt(source):
            return None
        src = self._source(source, now)
        if src.blocked_until > now:
            return Refusal(BLOCKED, max(1, math.ceil(src.blocked_until - now)))
        if not src.bucket.take(now):
            return Refusal(RATE, max(1, math.ceil(src.bucket.wait_s(now))))
        return None

    def take_intake(self, now: float) -> Refusal | None:
        """The process-wide verdict, asked last (after the checks that cost pjsua nothing): None = hand on."""
        if self._total.take(now):
            self.admitted += 1
            return None
        return Refusal(OVERLOAD, max(1, math.ceil(self._total.wait_s(now))))

    def unacked(self, source: str, now: float) -> bool:
        """An INVITE from `source` was answered and never ACKed; True when the source is now refused."""
        self.counts[UNACKED] += 1
        if self.exempt(source):
            return False
        src = self._source(source, now)
        src.unacked.append(now)
        while src.unacked and src.unacked[0] < now - self.cfg.unacked_window_s:
            src.unacked.popleft()
        if len(src.unacked) >= self.cfg.unacked_limit:
            src.unacked.clear()
            src.blocked_until = now + self.cfg.block_s
            return True
        return False

    def blocked_for(self, source: str, now: float) -> float:
        src = self._sources.get(source)
        return max(0.0, src.blocked_until - now) if src is not None else 0.0

    # ---- counting and reporting

    def refused(self, source: str, reason: str, now: float) -> Report | None:
        """Counts one refusal; the report to log and emit when this source is due one, else None."""
        self.counts[reason] += 1
        src = self._source(source, now)
        src.pending[reason] = src.pending.get(reason, 0) + 1
        if now - src.reported_at >= REPORT_EVERY_S and self._reports.take(now):
            return self._report(source, src, now)
        return None  # counted: the source's next report, or the sweep's sum of many sources, says it

    def sweep(self, now: float) -> list[Report]:
        """Reports for sources whose refusals waited a minute or more (beyond the report budget: one report
        summing them up); forgets sources with nothing to keep."""
        due = []
        for name, src in list(self._sources.items()):
            if src.pending and now - src.reported_at >= REPORT_EVERY_S:
                if self._reports.take(now):
                    due.append(self._report(name, src, now))
                else:
                    self._unreported.update(src.pending)
                    self._unreported_sources += 1
                    src.pending.clear()
                    src.reported_at = now
            elif self._idle(src, now):
                del self._sources[name]
        if self._unreported:
            due.append(Report(f"{self._unreported_sources} sources", dict(self._unreported), False))
            self._unreported.clear()
            self._unreported_sources = 0
        return due

    def _report(self, name: str, src: _Source, now: float) -> Report:
        first = now - src.reported_at >= 2 * REPORT_EVERY_S  # nothing reported in the previous minute either
        report = Report(name, dict(src.pending), first, max(0.0, src.blocked_until - now))
        src.pending.clear()
        src.reported_at = now
        return report

    def _idle(self, src: _Source, now: float) -> bool:
        return (not src.pending and src.blocked_until <= now and not src.unacked and src.bucket.full(now)
                and now - src.reported_at >= REPORT_EVERY_S)

    def _source(self, source: str, now: float) -> _Source:
        src = self._sources.get(source)
        if src is None:
            src = self._sources[source] = _Source(
                TokenBucket(self.cfg.invite_rate_per_source, self.cfg.invite_burst_per_source, now))
            if len(self._sources) > SOURCES_KEPT:
                _, gone = self._sources.popitem(last=False)  # the least recently seen
                if gone.pending:  # reported with the sweep's sum
                    self._unreported.update(gone.pending)
                    self._unreported_sources += 1
        else:
            self._sources.move_to_end(source)
        return src

    def stats(self) -> dict:
        """Plain numbers: refusals by reason since start, INVITEs handed on, sources tracked and blocked now."""
        return {"refused": dict(self.counts), "admitted": self.admitted, "sources": len(self._sources)}
