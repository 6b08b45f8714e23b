"""Saving an edited flow file (the panel's editor) so that a reader never meets half a file or a broken one.

Why these steps: `callbot serve` reads the flow file again when a call starts (app/flow_reload.py), maybe
while the panel writes it, maybe from another process (`callbot web` beside serve). So the text is
checked first with the very checks `callbot flows check` runs (a file that fails them is never written),
then written to a temporary file in the same folder, flushed to disk and renamed over the old one: a
rename within a folder is atomic on POSIX (macOS too), a reader sees the old file or the new one. The
previous version stays beside it as `<name>.bak`, and the editor's copy carries the digest of the file it
was loaded from: a save over a file changed on disk since (another admin, a text editor) is refused
rather than silently undoing that change.

The same `save_text` writes the server's config file (app/bot_config.py): the checks differ, the way
of writing does not.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import threading

from callbot.flows.schema import Flow, FlowError, parse_flow_file


_WRITING = threading.Lock()  # two saves in one process (two admins' clicks): the digest check and the rename as one


class SaveError(Exception):
    """The file could not be saved; the text is the one line the user gets."""


class ChangedOnDisk(SaveError):
    """The file changed since the editor loaded it."""


def digest(data: bytes | str) -> str:
    """The digest an editor keeps of the file it loaded (sha256, hex)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_digest(path: str | os.PathLike) -> str | None:
    """The digest of the file now on disk, None when there is none."""
    try:
        return digest(pathlib.Path(path).read_bytes())
    except FileNotFoundError:
        return None


def save_text(path: str | os.PathLike, text: str, *, loaded: str | None = None) -> str:
    """Write `text` to `path` atomically, the previous file kept as `<path>.bak`; returns the new digest.
    `loaded`: the digest of the file the text was edited from (None: no check)."""
    with _WRITING:
        return _save(pathlib.Path(path), text.encode(), loaded)


def _save(p: pathlib.Path, data: bytes, loaded: str | None) -> str:
    now = file_digest(p)
    if loaded is not None and now is not None and now != loaded:
        raise ChangedOnDisk(f"{os.fspath(p)}: changed on disk since it was opened: reload the page "
                            "(your text is below) and apply your change again")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if p.exists():
            shutil.copymode(p, tmp)  # the old file's mode: a config readable by serve's user stays so
            shutil.copy2(p, p.with_name(p.name + ".bak"))
        os.replace(tmp, p)
        tmp = None
        _sync_dir(p.parent)
    except OSError as err:
        raise SaveError(f"{os.fspath(p)}: cannot write it ({err.strerror or err})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return digest(data)


def _sync_dir(folder: pathlib.Path) -> None:
    """The rename itself on disk (a power cut after the save keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(fd)


def save_flow(path: str | os.PathLike, text: str, *, loaded: str | None = None) -> tuple[Flow, str]:
    """Check `text` as the flow file at `path` (FlowError, worded as `callbot flows check` words it, and
    nothing written), then save it (SaveError); the checked Flow and the new digest."""
    flow = parse_flow_file(text, path)
    return flow, save_text(path, text, loaded=loaded)


__all__ = ["ChangedOnDisk", "FlowError", "SaveError", "digest", "file_digest", "save_flow", "save_text"]
