"""`callbot model-service --config FILE`: load the model once and serve the calls of several `callbot
serve` workers on this machine (engine/serving/inference_service.py; docs/capacity.md).

Why a command of its own: a model outlives its workers. Workers crash, restart or are added without
reloading 7B of weights or preparing the bots' prompts again; the service stays up, with the prompts
ready. It reads the same config as serve: `[model]` (weights, `service` = the Unix socket it listens
on, `max_calls`, `heartbeat_misses`: how many of a worker's announced heartbeat intervals it may
stay silent before it counts as stalled and its calls are closed), `[[bots]]` (each bot's prompt is
prepared at start; a call names its bot, an unknown name gets the first) and `[metrics]` (its own
Prometheus endpoint; `--metrics` gives another address when workers share the file).

Admission control is measured (engine/serving/step_budget.py): at warm-up B calls are stepped in one
batched round for B = 1, 2, ... until a round misses the budget (with `[model] batch = false`: one
session stepped B times back to back), and while running the engine's own rounds (batched) or the calls'
step times (one by one) keep the table current. `--step-delay-ms` (test and diagnosis only) makes every step that much
slower, to see admission refuse on a fast machine. `--engine echo` serves the echo line behind the same
socket, for trying the worker topology without weights.

This process never imports pjsua2 (nothing SIP runs here) and is the only one that loads MLX.
Exit status: 0 when stopped by SIGTERM/SIGINT, 1 when the inference thread failed, 2 for a user error.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from callbot.engine.serving.stderr_line import say
from callbot.app.errors import StartupError
from callbot.app.metrics import ServiceMetrics
from callbot.app.settings import ConfigError, Settings
from callbot.engine.serving.inference_service import InferenceService, ServiceError, check_socket_path
from callbot.engine.serving.step_budget import Admission, StepTimes


def run_model_service(settings: Settings, engine_kind: str = "model", *, metrics_address: str | None = None,
                      step_delay_ms: float | None = None) -> int:
    """Serve until SIGTERM/SIGINT (0) or until the inference thread fails (1)."""
    path = settings.model.service
    if not path:
        raise ConfigError("$.model.service: the model service needs the path of its Unix socket "
                          '(e.g. service = "/tmp/callbot-model.sock")')
    if step_delay_ms is not None and not 0 < step_delay_ms <= 10_000:
        raise ConfigError(f"--step-delay-ms must be in (0, 10000] ms, got {step_delay_ms:g}")
    if step_delay_ms is not None and engine_kind != "model":
        raise ConfigError("--step-delay-ms slows the model's steps: it needs --engine model")
    try:
        check_socket_path(path)
    except ServiceError as err:
        raise StartupError(str(err)) from None
    with _stop_on_signals() as stop, contextlib.ExitStack() as stack:
        times = StepTimes() if engine_kind == "model" else None
        engine, tx, realtime, bots = _build_engine(settings, engine_kind, times, step_delay_ms)
        stack.callback(engine.close)
        admission = Admission(times, settings.model.max_calls)
        try:
            service = InferenceService(engine, path, bots=bots, realtime=realtime, admission=admission,
                                       step_times=times, tx_max_ms=tx[0], tx_settle=tx[1],
                                       heartbeat_misses=settings.model.heartbeat_misses)
        except ServiceError as err:
            raise StartupError(str(err)) from None
        failed: list[str] = []
        stack.callback(lambda: service.close(failed[0] if failed else "the model service stopped"))
        metrics = ServiceMetrics(service.stats)
        address = metrics_address or (settings.metrics.address if settings.metrics.enabled else None)
        if address:
            try:
                metrics.serve(address)
            except (OSError, ValueError) as err:
                raise StartupError(f"metrics address {address!r}: {err}") from None
            stack.callback(metrics.close)
        service.start()
        say(f"model service listening on {path} ({engine_kind}; bots {', '.join(bots)}; {_capacity(admission)})")
        while not stop.wait(0.2):
            if engine.error is not None:
                failed.append(f"the inference thread failed: {engine.error!r}")
                say(f"callbot: error: {failed[0]}; the model service stops")
                return 1
    return 0


def _build_engine(settings: Settings, kind: str, times: StepTimes | None, step_delay_ms: float | None):
    """(engine, (tx_max_ms, tx_settle), realtime policy, bot names)."""
    if kind == "echo":
        from callbot.engine.serving.echo import EchoEngine

        engine = EchoEngine()
        return engine, engine.tx_policy(), "unchanged", [b.name for b in settings.bots]
    if kind != "model":
        raise ConfigError(f"unknown engine {kind!r}, expected model or echo")
    import numpy as np

    from callbot.app.model_setup import prepare_model
    from callbot.engine.model.session import FRAME_SIZE
    from callbot.engine.serving.inference_process import InferenceStartupError
    from callbot.engine.model.session import Model
    from callbot.engine.serving.runner import DEFAULT_SLOTS, BotPrompts, ModelEngine, measure_batched_rounds
    from callbot.engine.serving.step_budget import measure_rounds
    from callbot.engine.serving.tx_policy import MODEL_TX_MAX_MS, MODEL_TX_SETTLE_PUSHES

    try:
        model, prompts, warmup = prepare_model(settings)
    except InferenceStartupError as err:
        raise StartupError(str(err)) from None
    if step_delay_ms is not None:
        from callbot.engine.serving.step_delay import SlowModel

        model = SlowModel(model, step_delay_ms / 1000)
    default = next(iter(prompts.values()))
    prompt_for = BotPrompts(prompts)  # a worker's PrepareBot swaps a bot there, for every worker's next calls

    # batched unless [model] batch = false, or the model is wrapped (--step-delay-ms) and so steps one by one
    batched = settings.model.batch and isinstance(model, Model)

    def warm_and_measure() -> None:  # on the inference thread: MLX's graphs and streams are per thread
        if warmup is not None:
            warmup()
        if batched:  # B calls in one forward per round
            measure_batched_rounds(model, default, times)
            return
        session = model.open_session(snapshot=default.snapshot, seed=0, sampling=default.sampling)
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        measure_rounds(lambda: session.step(silence), times)

    engine = ModelEngine(model, prompt_for, warmup=warm_and_measure, batch=batched,
                         slots=settings.model.max_calls or DEFAULT_SLOTS, align=settings.model.align,
                         resampler_phase=settings.model.resampler_phase, cpus=settings.model.cpus)
    rt = engine.realtime_result
    return engine, (MODEL_TX_MAX_MS, MODEL_TX_SETTLE_PUSHES), rt.policy if rt is not None else "unchanged", list(prompts)


def _capacity(admission: Admission) -> str:
    """One phrase for the start line: what limits the calls, with the measured rounds."""
    if admission.max_calls is not None:
        return f"max_calls {admission.max_calls}"
    rounds = admission.times.measured if admission.times is not None else {}
    if not rounds:
        return "no step measured: calls unlimited"
    shown = ", ".join(f"{b}: {1000 * s:.1f} ms" for b, s in rounds.items())
    one = rounds.get(1)
    if one is not None and one > admission.budget_s:
        say(f"callbot: warning: one step takes {1000 * one:.0f} ms, over the {1000 * admission.budget_s:.0f} ms a "
            "round may take: even one call will fall behind on this machine")
    return f"up to {admission.limit()} calls a round within {1000 * admission.budget_s:.0f} ms; rounds {shown}"


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the Event (app/serve.py has the same, but importing it would load pjsua2 here)."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
