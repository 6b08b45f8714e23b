"""make_realtime: what it reports is what the thread really runs under, missing privileges give a
fallback with a reason (never an exception), restore() undoes it, bad arguments raise ValueError.

Every call runs in its own threading.Thread (or a child process) so the pytest thread keeps its policy.
The unprivileged cases drop CAP_SYS_NICE in a child process and cap its RLIMIT_RTPRIO / RLIMIT_NICE,
which is exactly the situation of a bot started by an ordinary user.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from callbot.engine import RealtimeResult, make_realtime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduler API")


def in_thread(fn):
    """Run fn() in a fresh thread; return its value or raise its exception."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def seen_by_thread():
    """(policy, sched priority, nice) of the calling thread, as the kernel reports them."""
    return (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority,
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))


@linux_only
def test_result_matches_the_thread_and_restore_undoes_it():
    main_before = seen_by_thread()

    def body():
        before = seen_by_thread()
        result = make_realtime(80, 60, 80)
        during = seen_by_thread()
        result.restore()
        return before, result, during, seen_by_thread()

    before, result, during, after = in_thread(body)
    assert isinstance(result, RealtimeResult)
    policy, sched_priority, nice = during
    if result.policy == "SCHED_FIFO":
        assert policy == os.SCHED_FIFO
        assert sched_priority == result.priority
        assert result.realtime
    else:
        assert result.policy == "SCHED_OTHER"
        assert policy == os.SCHED_OTHER
        assert nice == result.priority
        assert not result.realtime
        assert "SCHED_FIFO" in result.reason
    assert after == before
    assert seen_by_thread() == main_before  # the pytest thread was never touched


# A child that drops CAP_SYS_NICE (the capability that bypasses the rlimits), sets the two rlimits a
# distribution grants ordinary users (/etc/security/limits.conf: rtprio, nice), and reports.
CHILD = textwrap.dedent("""
    import ctypes, json, os, resource, sys, threading
    rtprio, nice_limit = int(sys.argv[1]), int(sys.argv[2])
    try:
        resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))
        resource.setrlimit(resource.RLIMIT_NICE, (nice_limit, nice_limit))
    except (ValueError, OSError):
        sys.exit(77)  # an unprivileged runner cannot raise its hard limits: case not reproducible
    libc = ctypes.CDLL(None, use_errno=True)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        sys.exit(77)
    CAP_SYS_NICE = 23
    data[0].effective &= ~(1 << CAP_SYS_NICE)
    data[0].permitted &= ~(1 << CAP_SYS_NICE)
    data[0].inheritable &= ~(1 << CAP_SYS_NICE)
    if libc.capset(ctypes.byref(header), data) != 0:
        sys.exit(77)
    from callbot.engine import make_realtime
    PR_GET_TIMERSLACK = 30
    out = {}
    def body():  # threads inherit the credentials of the thread that starts them
        r = make_realtime(80, 60, 80)
        out.update(policy=r.policy, priority=r.priority, reason=r.reason,
                   seen_policy=os.sched_getscheduler(0),
                   seen_sched_priority=os.sched_getparam(0).sched_priority,
                   seen_nice=os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                   seen_slack=libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0))
        r.restore()
        out["restored_slack"] = libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
        out["restored_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=body)
    t.start()
    t.join()
    print(json.dumps(out))
""")


def run_unprivileged(rtprio, nice_limit):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(rtprio), str(nice_limit)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode == 77:
        pytest.skip("cannot set up the unprivileged case here (rlimits or capabilities)")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@linux_only
def test_without_privilege_it_falls_back_to_sched_other_with_the_reason():
    out = run_unprivileged(rtprio=0, nice_limit=0)
    assert out["policy"] == "SCHED_OTHER"
    assert out["seen_policy"] == os.SCHED_OTHER
    assert out["priority"] == out["seen_nice"] == 0  # nice -10 refused too: RLIMIT_NICE 0
    assert "SCHED_FIFO priority 10 refused (EPERM" in out["reason"]
    assert "nice -10 refused" in out["reason"]
    assert out["seen_slack"] == 1  # timer slack removed under SCHED_OTHER...
    assert out["restored_slack"] > 1  # ...and given back by restore()


@linux_only
def test_rlimit_nice_gives_the_lowest_nice_it_allows():
    out = run_unprivileged(rtprio=0, nice_limit=25)  # nice may go down to 20 - 25 = -5
    assert out["policy"] == "SCHED_OTHER"
    assert out["priority"] == out["seen_nice"] == -5
    assert "nice -10 refused" in out["reason"]
    assert out["restored_nice"] == 0


@linux_only
def test_rlimit_rtprio_gives_sched_fifo_at_the_priority_it_allows():
    out = run_unprivileged(rtprio=5, nice_limit=0)
    assert out["policy"] == "SCHED_FIFO"
    assert out["seen_policy"] == os.SCHED_FIFO
    assert out["priority"] == out["seen_sched_priority"] == 5
    assert "RLIMIT_RTPRIO allowed priority 5" in out["reason"]


def test_restore_on_another_thread_raises_and_changes_nothing():
    made = threading.Event()
    tried = threading.Event()
    box = {}

    def body():
        box["result"] = make_realtime(80, 60, 80)
        box["during"] = seen_by_thread() if sys.platform.startswith("linux") else None
        made.set()
        tried.wait(timeout=30)
        box["after_foreign_restore"] = seen_by_thread() if sys.platform.startswith("linux") else None
        box["result"].restore()

    main_before = seen_by_thread() if sys.platform.startswith("linux") else None
    t = threading.Thread(target=body)
    t.start()
    try:
        assert made.wait(timeout=30)
        with pytest.raises(RuntimeError, match="same thread|thread that called"):
            box["result"].restore()
    finally:
        tried.set()
        t.join(timeout=30)
    assert box["after_foreign_restore"] == box["during"]
    if main_before is not None:
        assert seen_by_thread() == main_before


@pytest.mark.parametrize(
    "args, kwargs, what",
    [
        ((0, 0, 0), {}, "period_ms"),
        ((-80, 60, 80), {}, "period_ms"),
        ((float("nan"), 60, 80), {}, "period_ms"),
        ((float("inf"), 60, 80), {}, "period_ms"),
        (("80", 60, 80), {}, "period_ms"),
        ((1001, 60, 80), {}, "period_ms"),
        ((80, 0, 80), {}, "computation_ms"),
        ((80, None, 80), {}, "computation_ms"),
        ((80, 60, True), {}, "constraint_ms"),
        ((80, 70, 60), {}, "computation_ms <= constraint_ms"),
        ((80, 60, 90), {}, "constraint_ms <= period_ms"),
        ((80, 60, 80), {"priority": 0}, "priority"),
        ((80, 60, 80), {"priority": 100}, "priority"),
        ((80, 60, 80), {"priority": 10.0}, "priority"),
        ((80, 60, 80), {"nice": -21}, "nice"),
        ((80, 60, 80), {"nice": 20}, "nice"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, what):
    main_before = seen_by_thread() if sys.platform.startswith("linux") else None
    with pytest.raises(ValueError, match=what):
        in_thread(lambda: make_realtime(*args, **kwargs))
    if main_before is not None:
        assert seen_by_thread() == main_before
