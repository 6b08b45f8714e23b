"""A guard for pjsua2 callbacks written in Python: an exception is logged and goes no further.

Why: when a Python callback raises, pjsua2's SWIG layer prints the error with PyErr_Print, which keeps
it in sys.last_traceback - and with it the callback's `self`, a Call or Account, until the next error.
A pjsua2 object that outlives libDestroy aborts the process when it finally goes (an assertion in
pjsua_call_set_user_data). Logging the exception here leaves no such reference behind.
"""
from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def guarded(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self, prm):
        try:
            return fn(self, prm)
        except Exception:
            log.exception("pjsua2 callback %s.%s failed", type(self).__name__, fn.__name__)
    return wrapper


def forget_printed_errors() -> None:
    """Drops what PyErr_Print kept of the last error printed from a callback not guarded here."""
    sys.last_type = sys.last_value = sys.last_traceback = None
    if hasattr(sys, "last_exc"):  # Python 3.12
        sys.last_exc = None
