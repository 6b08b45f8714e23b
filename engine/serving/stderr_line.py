"""One line to stderr, whole, from any thread.

Why not print(): it writes the text and the newline in two calls, so two threads' lines can interleave
between them. Seen in CI: a model service's two "worker N connected" lines, logged from two connection
threads at once, arrived as one line followed by an empty one (and a test that counted them failed).
One write of the whole line under a lock keeps lines whole within this process, so the app's own lines
(serve's, the edge's, the model service's) go through it too: in one process with the engine's, a
print() of theirs could still take an engine line between its text and its newline."""
from __future__ import annotations

import sys
import threading

_lock = threading.Lock()


def say(line: str) -> None:
    """`line` and a newline to stderr in one write, flushed."""
    with _lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
