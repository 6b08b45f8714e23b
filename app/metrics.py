"""Prometheus metrics of a running server: calls, registration, the audio path's health, the event bus.

Metrics are a subscriber of the app's event bus (the endpoint's events, the engine's per-frame stage
stamps as they come and each call's summary as it closes), never fed from the media callbacks: the hot
path only counts in its own structures, and this module reads them after the fact. The registry is private to each `Metrics` (no global default registry), so several servers
or tests in one process never mix their numbers.
"""
from __future__ import annotations

import shutil
from typing import Callable, Iterator, Mapping, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from callbot.app.event_bus import BusEvent, EventBus
from callbot.app.metrics_server import MetricsServer
from callbot.engine.contract import FlowTransition, FrameStages, SessionClosed
from callbot.engine.serving.frame_stats import STAGES
from callbot.sip import events as ev

# per-stage latencies of the audio path span 0.1 ms (a ring hand-off) to a few hundred ms (a slow step)
LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.16, 0.25, 0.5, 1.0)


# an analysis takes ~0.5 s for a short call with the live caller words, a minute or more for a long call
# transcribed again post-call (BENCHMARKS.md "Speech analytics")
ANALYSIS_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_TRANSITIONS = tuple(f"{a}->{b}" for a, b in zip(STAGES, STAGES[1:]))


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), port 0 = any free port; ValueError with the reason otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not int(port) < 65536:
        raise ValueError(f"metrics address {address!r} must be host:port with a port in 0..65535")
    return host.strip("[]"), int(port)


class AnalysisHostLike(Protocol):
    @property
    def pending(self) -> int: ...


class _AnalysisCollector(Collector):
    def __init__(self, host: AnalysisHostLike):
        self.host = host

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("callbot_analysis_pending", "Finished calls waiting for their analysis or being "
                                "analysed", value=self.host.pending)


class RecorderLike(Protocol):
    directory: str

    @property
    def unwritten(self) -> int: ...

    @property
    def held_s(self) -> float: ...

    @property
    def trouble(self) -> "DiskTroubleLike": ...


class DiskTroubleLike(Protocol):
    errors: int
    lost_s: float
    failing: set


class _RecorderCollector(Collector):
    """What the recordings' disk refused, and the room left on it (read at each scrape: an alert on it
    comes before the disk is full)."""

    def __init__(self, recorder: RecorderLike):
        self.recorder = recorder

    def collect(self) -> Iterator:
        trouble = self.recorder.trouble
        yield CounterMetricFamily("callbot_recording_write_errors", "Writes of call recordings, records or "
                                  "events the disk refused (full, failing)", value=trouble.errors)
        yield CounterMetricFamily("callbot_recording_lost_seconds", "Seconds of call audio the disk did not take "
                                  "(silence in the recording stands in for it)", value=trouble.lost_s)
        yield GaugeMetricFamily("callbot_recording_failing_calls", "Calls whose files the disk refuses now",
                                value=len(trouble.failing))
        yield GaugeMetricFamily("callbot_recording_held_seconds", "Seconds of call audio held in memory for a "
                                "disk that refuses it (written when it takes writes again)",
                                value=self.recorder.held_s)
        yield GaugeMetricFamily("callbot_recording_unwritten", "Finished calls whose final record waits for "
                                "the disk", value=self.recorder.unwritten)
        try:
            free = shutil.disk_usage(self.recorder.directory).free
        except OSError:
            return  # the folder is gone: the write errors say so
        yield GaugeMetricFamily("callbot_recordings_free_bytes", "Bytes free on the recordings' disk", value=free)


class RetentionJobLike(Protocol):
    runs: int
    failures: int
    deleted: int
    not_deleted: int
    last_success: float


class _RetentionCollector(Collector):
    """serve's purge of old calls (store/retention.py RetentionJob): an alert on the last success's age, or
    on failures, says calls are being kept past their period."""

    def __init__(self, job: RetentionJobLike):
        self.job = job

    def collect(self) -> Iterator:
        job = self.job
        yield CounterMetricFamily("callbot_retention_runs", "Purges of old calls that ran to their end",
                                  value=job.runs)
        yield CounterMetricFamily("callbot_retention_failures", "Purges of old calls that failed (tried again "
                                  "an hour later)", value=job.failures)
        yield CounterMetricFamily("callbot_retention_deleted_calls", "Calls deleted for their age",
                                  value=job.deleted)
        yield CounterMetricFamily("callbot_retention_files_not_deleted", "Files of old calls a purge could not "
                                  "delete (their call is tried again)", value=job.not_deleted)
        yield GaugeMetricFamily("callbot_retention_last_success_timestamp_seconds", "When the last purge ran to "
                                "its end (Unix time; 0: none yet)", value=job.last_success)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.calls_active = Gauge("callbot_calls_active", "Calls in progress", registry=r)
        self.calls_total = Counter("callbot_calls_total", "Calls ended, by direction and cause",
                                   ["direction", "cause"], registry=r)
        self.calls_rejected = Counter("callbot_calls_rejected_total", "INVITEs refused before answer, by code",
                                      ["code"], registry=r)
        self.registered = Gauge("callbot_registration_state", "1 when the account is registered",
                                ["account"], registry=r)
        self.dtmf = Counter("callbot_dtmf_total", "DTMF digits received", ["method"], registry=r)
        self.stage_latency = Histogram("callbot_stage_latency_seconds", "Audio path latency per stage",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.step_seconds = Histogram("callbot_step_seconds", "Engine step duration",
                                      buckets=LATENCY_BUCKETS_S, registry=r)
        self.underruns = Counter("callbot_underruns_total", "Frames played as silence: nothing to send", registry=r)
        self.overruns = Counter("callbot_overruns_total", "Writes that found a ring full (audio dropped)", registry=r)
        self.steps_late = Counter("callbot_steps_late_total", "Engine steps slower than the frame period",
                                  registry=r)
        # the network half of the audio path, one observation per call (pjmedia's statistics at its end)
        self.jitter_buffer = Histogram("callbot_jitter_buffer_delay_seconds",
                                       "Average time a call's audio spent in pjmedia's jitter buffer",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.rtp_lost = Counter("callbot_rtp_lost_total", "RTP packets from callers that never arrived", registry=r)
        # requests the SIP gate answered before pjsua took them up (sip/admission.py's reasons), and answered
        # INVITEs never ACKed; counted from SourceRefused, which reports each source at most once a minute
        self.sip_refused = Counter("callbot_sip_refused_total", "SIP requests refused before pjsua took them up, "
                                   "by reason", ["reason"], registry=r)
        # call flows (flows/): every move by the state it went to ("end" when the flow ended) and why
        self.flow_transitions = Counter("callbot_flow_transitions_total", "Call flow transitions, by flow, the "
                                        "state entered and the reason", ["flow", "state", "reason"], registry=r)
        # speech analytics of finished calls (app/analysis_host.py): done, failed (a worker died), dropped
        # (the pool was full), left (serve stopped first); the last three wait for `callbot calls analyze`
        self.analyses = Counter("callbot_analyses_total", "Calls analysed after hang-up, by result (done, "
                                "failed, dropped, left)", ["result"], registry=r)
        self.analysis_seconds = Histogram("callbot_analysis_seconds", "Time one call's analysis took in its "
                                          "worker", buckets=ANALYSIS_BUCKETS_S, registry=r)
        self._direction: dict[str, str] = {}
        self._server: MetricsServer | None = None

    def on_analysis(self, result: str, seconds: float | None = None) -> None:
        """One call's analysis ended (app/analysis_host.py; a pool thread)."""
        self.analyses.labels(result).inc()
        if seconds is not None:
            self.analysis_seconds.observe(seconds)

    def watch_recorder(self, recorder: RecorderLike) -> None:
        """callbot_recording_write_errors/lost_seconds/failing_calls/held_seconds/unwritten,
        callbot_recordings_free_bytes."""
        self.registry.register(_RecorderCollector(recorder))

    def watch_retention(self, job: RetentionJobLike) -> None:
        """callbot_retention_runs/failures/deleted_calls/files_not_deleted,
        callbot_retention_last_success_timestamp_seconds."""
        self.registry.register(_RetentionCollector(job))

    def watch_analysis(self, host: "AnalysisHostLike") -> None:
        """callbot_analysis_pending: calls waiting for the analysis or being analysed."""
        self.registry.register(_AnalysisCollector(host))

    # ---- inputs -----------------------------------------------------------------------------------

    def on_event(self, event: BusEvent) -> None:
        if isinstance(event, FrameStages):
            self.on_frame_stages(event.rows)
        elif isinstance(event, SessionClosed):
            self.on_call_summary(msgspec.to_builtins(event.summary))
        elif isinstance(event, ev.RegistrationChanged):
            self.registered.labels(event.account).set(1 if event.registered else 0)
        elif isinstance(event, ev.RegistrationFailed):
            self.registered.labels(event.account).set(0)
        elif isinstance(event, ev.CallConfirmed):
            self._direction[event.call_id] = event.direction
            self.calls_active.inc()
        elif isinstance(event, ev.CallEnded):
            direction = self._direction.pop(event.call_id, None)
            if direction is not None:
                self.calls_active.dec()
            self.calls_total.labels(direction or "unanswered", event.cause).inc()
            if event.stream:
                self.jitter_buffer.observe(event.stream["jitter_buffer_ms"]["avg"] / 1000)
                self.rtp_lost.inc(max(0, event.stream["rx_lost"]))
        elif isinstance(event, ev.CallRejected):
            self.calls_rejected.labels(str(event.code)).inc()
        elif isinstance(event, ev.DtmfReceived):
            self.dtmf.labels(event.method).inc()
        elif isinstance(event, FlowTransition):
            self.flow_transitions.labels(event.flow, event.to_state or "end", event.reason).inc()
        elif isinstance(event, ev.SourceRefused):
            for reason, n in event.counts.items():
                self.sip_refused.labels(reason).inc(n)

    def on_frame_stages(self, rows: list[list[int]]) -> None:
        """Per-frame stage stamps (ns, STAGES order, 0 unknown): each known transition, in seconds."""
        for row in rows:
            for name, a, b in zip(_TRANSITIONS, row, row[1:]):
                if a and b:
                    self.stage_latency.labels(name).observe((b - a) / 1e9)

    def on_call_summary(self, summary: Mapping) -> None:
        """A call's audio-path summary at hang-up: counters, step times and, if given, raw per-stage
        latencies (seconds; `callbot serve` has them live from FrameStages instead)."""
        self.underruns.inc(summary.get("underruns", 0))
        self.overruns.inc(summary.get("overruns", 0))
        self.steps_late.inc(summary.get("steps_late", 0))
        for stage, values in summary.get("stage_latency_s", {}).items():
            hist = self.stage_latency.labels(stage)
            for v in values:
                hist.observe(v)
        for v in summary.get("step_s", ()):
            self.step_seconds.observe(v)

    def watch_bus(self, bus: EventBus) -> None:
        """Exports each bus subscriber's drops, handler errors and backlog (read when scraped)."""
        self.registry.register(_BusCollector(bus))

    def watch_admission(self, engine: "AdmittingEngine") -> None:
        """A worker on a shared model service: calls refused by reason, and whether it is connected."""
        self.registry.register(_AdmissionCollector(engine))

    # ---- outputs ----------------------------------------------------------------------------------

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on `address` (host:port; port 0 picks one) from one thread, whatever the number of
        connections (app/metrics_server.py); returns the bound (host, port)."""
        host, port = parse_address(address)
        self._server = MetricsServer(self.registry, host, port)
        return self._server.address

    @property
    def address(self) -> tuple[str, int] | None:
        """Where /metrics is served (the bound port, also when asked for port 0); None when not served."""
        return self._server.address if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class _BusCollector(Collector):
    """A slow subscriber loses events without slowing anyone: this makes the loss visible."""

    def __init__(self, bus: EventBus):
        self.bus = bus

    def collect(self) -> Iterator:
        dropped = CounterMetricFamily("callbot_event_bus_dropped", "Events a subscriber's full queue dropped",
                                      labels=["subscriber"])
        errors = CounterMetricFamily("callbot_event_bus_handler_errors", "Events a subscriber's handler failed on",
                                     labels=["subscriber"])
        pending = GaugeMetricFamily("callbot_event_bus_pending", "Events waiting in a subscriber's queue",
                                    labels=["subscriber"])
        for sub in self.bus.subscriptions:
            dropped.add_metric([sub.name], sub.dropped)
            errors.add_metric([sub.name], sub.errors)
            pending.add_metric([sub.name], sub.pending)
        yield from (dropped, errors, pending)


class AdmittingEngine(Protocol):
    """What the worker's metrics read of its model service client (engine/serving/service_client.py)."""

    @property
    def connected(self) -> bool: ...

    def refusals(self) -> dict[str, int]: ...


class _AdmissionCollector(Collector):
    """Refused calls are counted by the reason the service (or its absence) gave, not only by SIP code."""

    def __init__(self, engine: AdmittingEngine):
        self.engine = engine

    def collect(self) -> Iterator:
        refused = CounterMetricFamily("callbot_admission_refused", "Calls refused before answer for want of "
                                      "model capacity, by reason", labels=["reason"])
        for reason, n in sorted(self.engine.refusals().items()):
            refused.add_metric([reason], n)
        up = GaugeMetricFamily("callbot_model_service_up", "1 while connected to the model service")
        up.add_metric([], 1 if self.engine.connected else 0)
        yield from (refused, up)


class ServiceStatsLike(Protocol):
    workers: int
    calls: int
    reserved: int
    limit: int | None
    refused: dict[str, int]
    round_s: dict[int, float]
    dropped: dict[str, int]


class ServiceMetrics:
    """The model service's own metrics (`callbot model-service`, engine/serving/inference_service.py):
    slots used and the admission limit, seconds per round of steps by batch size, refusals by reason,
    workers connected. Read from `stats()` when scraped: the service keeps no metric objects."""

    def __init__(self, stats: Callable[[], ServiceStatsLike]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ServiceCollector(stats))
        self._server: MetricsServer | None = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, address: str) -> tuple[str, int]:
        host, port = parse_address(address)
        self._server = MetricsServer(self.registry, host, port)
        return self._server.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class _ServiceCollector(Collector):
    def __init__(self, stats: Callable[[], ServiceStatsLike]):
        self.stats = stats

    def collect(self) -> Iterator:
        st = self.stats()
        used = GaugeMetricFamily("callbot_service_slots_used", "Calls the model serves or has promised a slot")
        used.add_metric([], st.calls + st.reserved)
        calls = GaugeMetricFamily("callbot_service_calls", "Calls the model serves now")
        calls.add_metric([], st.calls)
        workers = GaugeMetricFamily("callbot_service_workers", "SIP workers connected")
        workers.add_metric([], st.workers)
        refused = CounterMetricFamily("callbot_service_refused", "Calls refused for want of capacity, by reason",
                                      labels=["reason"])
        for reason, n in sorted(st.refused.items()):
            refused.add_metric([reason], n)
        rounds = GaugeMetricFamily("callbot_service_round_seconds", "Seconds a round of steps takes, by the "
                                   "number of calls in it (measured at warm-up and from live steps)",
                                   labels=["batch"])
        for batch, seconds in sorted(st.round_s.items()):
            rounds.add_metric([str(batch)], seconds)
        dropped = CounterMetricFamily("callbot_service_events_dropped", "Live events dropped for workers that did "
                                      "not read them in time, by kind (FrameStages first)", labels=["kind"])
        for kind, n in sorted(st.dropped.items()):
            dropped.add_metric([kind], n)
        yield from (used, calls, workers, refused, rounds, dropped)
        if st.limit is not None:  # unbounded (nothing measured, no max_calls): no number to show
            limit = GaugeMetricFamily("callbot_service_slots_limit", "Calls the model takes at once now "
                                      "(max_calls, else what its measured round time fits into the frame)")
            limit.add_metric([], st.limit)
            yield limit
