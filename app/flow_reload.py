"""A bot's flow file taken again by `callbot serve` for the next call, without touching calls in progress.

Why checked when a call starts, not watched: a call start is the one moment the flow matters, and a
`stat` there costs microseconds, so there is no watcher thread, no inotify/FSEvents pair to keep (Linux
and macOS alike), and it works the same whoever wrote the file: the panel inside serve ([web] listen),
`callbot web` in another process over the same files, or a text editor. Only when the file's identity
(mtime, size, inode) changed is it read; only when its bytes' digest changed is it checked again, with
the checks of `callbot flows check` (flows/schema.py), and its clips decoded. A file that passes
replaces the bot's flow for the calls that start from then on; a call in progress keeps the Flow its
runner was made with (runners hold their own, immutable, Flow). A file that fails keeps the last good
flow running and logs one error line (once per bad content, not once per call), so a half-saved or
mistyped file never reaches a caller. The panel writes by rename (flows/file_save.py), so a reader sees
the old file or the new one, never a mix; a file written in place and caught midway fails its check
and is read again at the next call, when its mtime has moved on.

All of it runs on the flow thread (app/flow_host.py), which opens every runner: no lock is needed,
and a reload delays that thread by the time to parse a small TOML file and decode its new clips.
What is not reloaded here: the bots' voice, persona, sampling, language and routes, prepared or read
at serve's start (app/bot_config.py says so to the editor); and a bot that had no flow at start does
not gain one (its calls are not given to the flow host).
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from callbot.flows.schema import Flow, FlowError, parse_flow_file

log = logging.getLogger(__name__)

Clip = tuple[np.ndarray, int]


@dataclass
class _Source:
    path: str
    name: str
    flow: Flow
    identity: tuple[int, int, int] | None
    digest: str | None
    bad: str | None = None  # the digest of the last content that failed, reported once


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class FlowFiles:
    """The flows of the bots that have one, each taken again from its file when that changed.

    `flows`: bot -> (flow name, Flow) as loaded at start; `paths`: bot -> its file; `load_clip(path)`
    decodes a WAV clip (raising OSError/ValueError); `clips`: the host's decoded clips, which a reload
    fills for the new flow's clips; `can_speak()`: whether `say`/`inform`/`announce` texts can be
    spoken (a flow that needs text to speech when serve has none is refused, as at start)."""

    def __init__(self, flows: dict[str, tuple[str, Flow]], paths: dict[str, str],
                 load_clip: Callable[[str], Clip], clips: dict[str, Clip],
                 can_speak: Callable[[], bool] = lambda: True):
        self.load_clip = load_clip
        self.clips = clips
        self.can_speak = can_speak
        self.reloads = 0
        self.failures = 0
        self._sources: dict[str, _Source] = {}
        for bot, (name, flow) in flows.items():
            path = paths[bot]
            self._sources[bot] = _Source(path, name, flow, _identity(path), _digest_of(path))

    def __contains__(self, bot: str) -> bool:
        return bot in self._sources

    def current(self, bot: str) -> tuple[str, Flow]:
        """The bot's flow for a call starting now: its file's, when that changed and passes its checks."""
        src = self._sources[bot]
        identity = _identity(src.path)
        if identity is not None and identity != src.identity:
            src.identity = identity
            self._reload(bot, src)
        return src.name, src.flow

    def _reload(self, bot: str, src: _Source) -> None:
        try:
            data = pathlib.Path(src.path).read_bytes()
        except OSError as err:
            self._failed(bot, src, None, f"{src.path}: cannot read the flow file ({err.strerror})")
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == src.digest:  # touched, not changed
            return
        if digest == src.bad:  # the same broken content: said once already
            return
        try:
            flow = parse_flow_file(data, src.path)
            if not self.can_speak() and any(s.say or s.inform or s.announce for s in flow.states.values()):
                raise FlowError(f"{src.path}: a state speaks (say, inform or announce) and serve started "
                                "without text to speech: restart serve to load it")
            fresh = {}
            for state in flow.states.values():
                for clip in (state.play, state.hold_music):
                    if clip and clip not in fresh:
                        try:
                            fresh[clip] = self.load_clip(clip)
                        except (OSError, ValueError) as err:
                            raise FlowError(f"{src.path}: clip {clip!r}: {err}") from None
        except FlowError as err:
            self._failed(bot, src, digest, str(err))
            return
        self.clips.update(fresh)  # before the flow: a runner made from it finds its clips decoded
        src.flow, src.digest, src.bad = flow, digest, None
        self.reloads += 1
        log.warning("bot %s: flow %s reloaded (%d states); calls from now on follow it", bot, src.path,
                    len(flow.states))

    def _failed(self, bot: str, src: _Source, digest: str | None, why: str) -> None:
        self.failures += 1
        src.bad = digest
        log.error("bot %s: the flow file changed but does not pass its checks, the last good flow goes on: %s",
                  bot, why)


def _digest_of(path: str) -> str | None:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
