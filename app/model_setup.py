"""Loading the model behind `callbot serve`: weights found and loaded, every bot's prompt prepared, and
the warm-up a call's first step would otherwise pay for.

Why a module of its own: this runs inside the inference process (engine/serving/inference_process.py), which
must never import pjsua2, so it imports settings and the engine only (not app/serve.py or the endpoint).
Every problem is a ModelSetupError whose text says what is missing and how to get it: the one line the
user sees before `serve` exits with status 2.

Weights are found as docs/model.md, "Where the weights come from", says: `[model] path` (or
`--model DIR`), else the Hugging Face cache,
else a huggingface_hub download where the user accepted the license and is logged in.
"""
from __future__ import annotations

import os

import msgspec
import numpy as np

from callbot.engine.serving.stderr_line import say
from callbot.engine.serving.inference_process import InferenceSetup, InferenceStartupError
from callbot.engine.model.lm_config import LmConfig
from callbot.engine.model.mimi import MimiConfig
from callbot.engine.serving.runner import BotPrompt
from callbot.engine.model.sampling import SamplingConfig
from callbot.engine.model.session import FRAME_SIZE, Model
from callbot.engine.model.weights import HF_REPO, WeightsError, find_weights, hf_hub_cache
from callbot.app.settings import BotSettings, ModelSettings, Settings

WARMUP_FRAMES = 2  # first steps pay for kernel compilation and allocation; do it before a caller does


class ModelSetupError(InferenceStartupError):
    """The model or a bot could not be prepared; the text is the user's one line."""


class Architecture(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    lm: LmConfig
    mimi: MimiConfig


def load_architecture(path: str) -> tuple[LmConfig, MimiConfig]:
    try:
        with open(path, "rb") as f:
            arch = msgspec.json.decode(f.read(), type=Architecture)
    except OSError as err:
        raise ModelSetupError(f"model architecture {path!r}: cannot read it ({err.strerror})") from None
    except (msgspec.MsgspecError, ValueError) as err:
        raise ModelSetupError(f"model architecture {path!r}: {err}") from None
    return arch.lm, arch.mimi


def _sampling(bot: BotSettings) -> SamplingConfig:
    s = bot.sampling
    return SamplingConfig(text_temperature=s.text_temperature, text_top_k=s.text_top_k,
                          audio_temperature=s.audio_temperature, audio_top_k=s.audio_top_k)


# what to do next when the weights are not there, said the same way in every case
NO_WEIGHTS_NEXT = ("`--engine echo` tries the line without weights; `--model DIR` takes weights you have")
LOGIN_NEXT = (f"accept the license at https://huggingface.co/{HF_REPO} and log in with `huggingface-cli login` "
              "to download them")


def find_model_files(m: ModelSettings) -> str:
    """The folder holding the weights: `[model] path` (`--model DIR`), else the Hugging Face cache, else a
    download; else a ModelSetupError saying what is missing and the next step, in one line."""
    try:
        return os.fspath(find_weights(m.path, download=m.download))
    except WeightsError as err:
        raise ModelSetupError(missing_weights_text(err, m)) from None


def missing_weights_text(err: WeightsError, m: ModelSettings) -> str:
    """The user's one line about weights that are not there. huggingface_hub's own texts run over several
    lines and talk about revisions and snapshot folders: they are named by their kind here instead."""
    if m.path is not None:
        return (f"model weights: {err}. Next: point `--model` ([model] path) at the folder holding them; "
                "`--engine echo` tries the line without weights")
    where = f"{HF_REPO} is not in the Hugging Face cache ({hf_hub_cache()})"
    if not m.download:
        return (f"no model weights: {where} and downloads are off ([model] download = false). "
                f"Next: {NO_WEIGHTS_NEXT}")
    why = _download_failure(err.__cause__)
    return f"no model weights: {where} and the download failed ({why}). Next: {NO_WEIGHTS_NEXT}; or {LOGIN_NEXT}"


def _download_failure(cause: BaseException | None) -> str:
    try:
        from huggingface_hub import constants, errors
    except ImportError:  # find_weights said so already
        return "huggingface_hub is not installed"
    if isinstance(cause, errors.GatedRepoError):
        return "the license is not accepted or you are not logged in"
    if isinstance(cause, errors.RepositoryNotFoundError):
        return "the repository is not visible: not logged in?"
    if isinstance(cause, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub cannot be reached"
    if isinstance(cause, ConnectionError) or type(cause).__name__ in ("ConnectionError", "Timeout", "ConnectTimeout"):
        return "the Hugging Face hub cannot be reached"
    text = str(cause).strip().splitlines()
    return text[0][:200] if text else type(cause).__name__


def load_model(settings: Settings) -> Model:
    m = settings.model
    lm_cfg, mimi_cfg = load_architecture(m.architecture) if m.architecture else (None, None)
    quantize = None if m.quantization == "none" else m.quantization
    directory = find_model_files(m)
    try:
        return Model.load(directory, quantize, lm_config=lm_cfg, mimi_config=mimi_cfg, kv_bits=m.kv_bits)
    except WeightsError as err:  # there but unusable: truncated, another model's
        raise ModelSetupError(f"model weights: {err}") from None


def prepare_model(settings: Settings) -> InferenceSetup:
    """The model loaded, each bot's prompt snapshot by name, and the warm-up for the inference thread."""
    model = load_model(settings)
    prompts: dict[str, BotPrompt] = {}
    for bot in settings.bots:
        say(f"preparing bot {bot.name!r} (voice {os.path.basename(bot.voice)})")
        try:
            snapshot = model.prepare(bot.voice, bot.persona, context=bot.context)
        except ValueError as err:
            raise ModelSetupError(f"bot {bot.name!r}: {err}") from None
        prompts[bot.name] = BotPrompt(snapshot, _sampling(bot), bot.sampling.seed)
    contexts = tuple(dict.fromkeys(bot.context for bot in settings.bots))
    return InferenceSetup(model, prompts, lambda: warm_up(model, list(prompts.values()), contexts))


def warm_up(model: Model, prompts: list[BotPrompt], contexts: tuple[int | None, ...] = (None,)) -> None:
    """Compile every graph a call will use (each KV span of each bot's context, each bot's sampling), then
    step a session. Runs on the inference thread: MLX caches compiled graphs per stream, and streams per
    thread."""
    for sampling in {p.sampling for p in prompts}:
        model.lm.warmup(sampling, contexts=contexts)
    session = model.open_session(snapshot=prompts[0].snapshot, seed=0, sampling=prompts[0].sampling)
    silence = np.zeros(FRAME_SIZE, dtype=np.float32)
    for _ in range(WARMUP_FRAMES):
        session.step(silence)
