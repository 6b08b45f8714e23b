"""A file replaced whole: written beside it and renamed over it, so a reader sees the old content or the
new, never half of one; on failure (a full disk) the temporary file is removed and the old one stays."""
from __future__ import annotations

import os


def replace_file(path: str, data: bytes) -> None:
    """`data` as the content of `path`, atomically (OSError when it cannot be written; `path` unchanged)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
