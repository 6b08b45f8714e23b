"""The model engine behind `callbot serve`: by default in its own process, else on a thread of this one.

Why a process: BENCHMARKS.md "Media callback" measured that a thread running Python next to pjmedia's
clock thread makes the bridge fall behind for good with 4 calls (p99 lateness 312-987 ms), so the model
runs in engine/serving/inference_process.py's child and only the calls' rings (shared memory) stay here.
`[model] process = false` keeps the in-process runner (engine/serving/runner.py), for a single call or a debugger.
Either way the model is loaded, every bot prepared and a step warmed up before the first call
(app/model_setup.py), and a problem there is a StartupError: one line, exit status 2.
"""
from __future__ import annotations

import functools
from typing import Any

from callbot.engine.serving.inference_process import InferenceProcess, InferenceStartupError
from callbot.engine.serving.runner import ModelEngine
from callbot.app.model_setup import bot_name_for, prepare_model
from callbot.app.errors import StartupError
from callbot.app.settings import Settings


def build_model_engine(settings: Settings) -> InferenceProcess | ModelEngine:
    bot_for = functools.partial(bot_name_for, settings)
    try:
        if settings.model.process:
            return InferenceProcess(functools.partial(prepare_model, settings), bot_for)
        model, prompts, warmup = prepare_model(settings)
    except InferenceStartupError as err:
        raise StartupError(str(err)) from None

    def prompt_for(call_info: Any):
        return prompts[bot_for(call_info)]

    return ModelEngine(model, prompt_for, warmup=warmup)
