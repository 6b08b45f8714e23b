"""pin_thread: the calling thread, and the threads it starts afterwards (MLX's stream thread), stay on the
CPUs asked for; a CPU the process may not use, or an OS without the call (macOS), is a reason and the
thread runs unpinned; bad lists raise ValueError. The runner pins its inference thread with
`cpus`, and MLX's stream thread with it; the inference process reports what its child got.

Every pin runs in a fresh thread so the pytest thread keeps the mask it had."""
from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np
import pytest

from callbot.engine.audio.cpu_affinity import check_cpus, pin_thread
from tests.test_realtime import in_thread

pytestmark = pytest.mark.timeout(120)
linux_only = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux affinity API")


def _last_cpu() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pinning to one CPU of one proves nothing")
    return cpus[-1]


def _threads_on(cpus: set[int]) -> list[int]:
    """This process's threads whose allowed CPUs are exactly `cpus` (Linux: per-thread masks)."""
    return [int(tid) for tid in os.listdir("/proc/self/task") if os.sched_getaffinity(int(tid)) == cpus]


@linux_only
def test_a_pinned_thread_and_the_threads_it_starts_stay_on_its_cpus():
    cpu, before = _last_cpu(), os.sched_getaffinity(0)

    def body():
        got = pin_thread([cpu])
        seen = {}
        child = threading.Thread(target=lambda: seen.update(mask=os.sched_getaffinity(0)))
        child.start()
        child.join(10)
        return got, os.sched_getaffinity(0), seen["mask"]

    got, mask, child_mask = in_thread(body)
    assert got.cpus == (cpu,) and got.reason is None
    assert mask == {cpu} and child_mask == {cpu}
    assert os.sched_getaffinity(0) == before  # this thread's mask: another thread's pin did not touch it


@linux_only
def test_cpus_the_process_may_not_use_are_a_reason_and_the_thread_keeps_the_others():
    allowed = os.sched_getaffinity(0)
    absent, present = max(allowed) + 1000, min(allowed)

    got, mask = in_thread(lambda: (pin_thread([absent]), os.sched_getaffinity(0)))
    assert got.cpus == ()
    assert got.reason == (f"not pinned to CPUs {absent}: none of them is a CPU this process may use "
                          "(sched_setaffinity: Invalid argument)")
    assert mask == allowed  # where it ran

    got, mask = in_thread(lambda: (pin_thread([present, absent]), os.sched_getaffinity(0)))
    assert got.cpus == (present,) and mask == {present}
    assert got.reason == (f"pinned to CPUs {present} only: the others of {present},{absent} are not CPUs this "
                          "process may use")


@linux_only
def test_a_thread_kept_off_a_cpu_may_still_be_pinned_to_it():
    cpu = _last_cpu()
    others = os.sched_getaffinity(0) - {cpu}

    def body():
        os.sched_setaffinity(0, others)  # as a process started on the other cores would be
        return pin_thread([cpu]), os.sched_getaffinity(0)

    got, mask = in_thread(body)
    assert got.cpus == (cpu,) and got.reason is None and mask == {cpu}


def test_without_an_affinity_call_the_thread_is_not_pinned_and_says_so(monkeypatch):
    # macOS's os module has no sched_setaffinity: the same path, on any OS
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    got = in_thread(lambda: pin_thread([0, 1]))
    assert got.cpus == ()
    assert got.reason == f"not pinned to CPUs 0,1: {sys.platform} has no call that keeps a thread on a core"


@pytest.mark.parametrize("bad", [[], [-1], ["1"], [True], None, 3, [1.0]])
def test_cpus_that_are_not_a_list_of_cpu_numbers_raise(bad):
    with pytest.raises(ValueError, match="cpus must be a non-empty list of CPU numbers >= 0"):
        check_cpus(bad)


def test_cpus_come_back_sorted_without_repeats():
    assert check_cpus([3, 1, 3]) == (1, 3)


@linux_only
def test_the_runner_pins_its_inference_thread_and_mlx_stream_thread(tmp_path):
    from callbot.engine import Model
    from callbot.engine.serving.runner import BotPrompt, ModelEngine
    from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

    cpu = _last_cpu()
    lm_cfg, mimi_cfg = tiny_model_configs()
    model = Model.load(write_tiny_model_dir(tmp_path), lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False,
                       progress=False)
    prompt = BotPrompt(model.prepare("NATF2", "You take orders."), seed=1)
    already = set(_threads_on({cpu}))
    # warm-up evaluates on the inference thread's own stream: MLX's stream thread exists once it returns
    engine = ModelEngine(model, lambda call: prompt, realtime=False, cpus=[cpu],
                         warmup=lambda: model.open_session(snapshot=prompt.snapshot, seed=0).step(
                             np.zeros(1920, np.float32)))
    try:
        assert engine.pinned.cpus == (cpu,) and engine.pinned.reason is None
        pinned = set(_threads_on({cpu})) - already
        # the inference thread and the stream thread MLX started for its stream, nothing else
        assert len(pinned) == 2, pinned
        assert os.sched_getaffinity(0) != {cpu}
    finally:
        engine.close()


@linux_only
def test_the_inference_process_reports_the_cpus_its_child_pinned(tmp_path):
    from callbot.app.model_setup import prepare_model
    from callbot.app.settings import BotSettings, ModelSettings, Settings
    from callbot.engine.serving.inference_process import InferenceProcess
    from tests.tiny_assets import write_tiny_model_for_serve

    cpu = _last_cpu()
    directory, arch = write_tiny_model_for_serve(tmp_path)
    settings = Settings(model=ModelSettings(path=str(directory), architecture=str(arch), quantization="none",
                                            download=False),
                        bots=(BotSettings(name="pizza", voice="NATM1", persona="You take orders."),))
    engine = InferenceProcess(functools.partial(prepare_model, settings), realtime=False, cpus=[cpu])
    try:
        assert engine.info.cpus == [cpu]
    finally:
        engine.close()
    engine = InferenceProcess(functools.partial(prepare_model, settings), realtime=False)
    try:
        assert engine.info.cpus == []
    finally:
        engine.close()
