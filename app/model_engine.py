"""The model engine behind `callbot serve`: by default in its own process, else on a thread of this one.

Why a process: BENCHMARKS.md "Media callback" measured that a thread running Python next to pjmedia's
clock thread makes the bridge fall behind for good with 4 calls (p99 lateness 312-987 ms), so the model
runs in engine/serving/inference_process.py's child and only the calls' rings (shared memory) stay here.
`[model] process = false` keeps the in-process runner (engine/serving/runner.py), for a single call or
a debugger. `[model] service` attaches to a model that `callbot model-service` loaded for several
serve processes (app/service_worker.py). Otherwise the model is loaded, every bot prepared and a step
warmed up before the first call (app/model_setup.py), and a problem there is a StartupError: one line,
exit status 2. A call's bot is named in its CallStart (the app's CallRouter picks it); an unknown name
gets the first bot. In every hosting the engine can prepare a bot again while it runs (the contract's
PrepareBot; app/bot_reload.py asks when the config changes).
"""
from __future__ import annotations

import functools

from callbot.app.errors import StartupError
from callbot.app.settings import Settings
from callbot.engine.contract import CallEngine
from callbot.engine.serving.inference_process import InferenceProcess, InferenceSetup, InferenceStartupError


def prepare_in_child(settings: Settings) -> InferenceSetup:
    """The child's setup. It names app/model_setup.py (MLX) only when it runs, so that pickling it for
    the child never imports the model into the SIP process."""
    from callbot.app.model_setup import prepare_model

    return prepare_model(settings)


def build_model_engine(settings: Settings) -> CallEngine:
    """An InferenceProcess (MLX in a child), or with `[model] process = false` a ModelEngine here, or with
    `[model] service` the shared model service's client (app/service_worker.py: nothing loaded here)."""
    if settings.model.service:
        from callbot.app.service_worker import build_service_engine

        return build_service_engine(settings)
    try:
        if settings.model.process:
            return InferenceProcess(functools.partial(prepare_in_child, settings), batch=settings.model.batch,
                                    align=settings.model.align, resampler_phase=settings.model.resampler_phase,
                                    cpus=settings.model.cpus)
        model, prompts, warmup = prepare_in_child(settings)
    except InferenceStartupError as err:
        raise StartupError(str(err)) from None
    from callbot.engine.serving.runner import SERVE_BATCHES, BotPrompts, ModelEngine

    # BotPrompts: a bot prepared again while serve runs (app/bot_reload.py) is swapped in there
    return ModelEngine(model, BotPrompts(prompts), warmup=warmup, batch=None if settings.model.batch else False,
                       warm_batches=SERVE_BATCHES, align=settings.model.align,
                       resampler_phase=settings.model.resampler_phase, cpus=settings.model.cpus)
