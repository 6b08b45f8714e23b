"""Our media port destroyed while pjmedia's clock thread ticks it: the race that corrupted the heap.

pjmedia's clock thread calls the port's callbacks (through SWIG's director, holding the port's lock and
then taking the GIL) while the SIP thread destroys the port. When the C++ destructor ran from the
Python object's deallocation, a tick waiting for the GIL meanwhile called a method of the half-freed
object: its reference count went 0 -> 1 -> 0, the object was freed twice, and the process died later in
an unrelated allocation (SIGSEGV in pymalloc_alloc; twice in CI, after a campaign dialer's hangup).
sip/media_port.py now destroys the C++ port explicitly while the Python object is whole, and its
fallback callbacks are static.

Here the race is made likely on purpose: a tone feeds a port of ours on a null-device bridge, a busy
thread contends for the GIL (so ticks wait for it inside the callback), and ports are made, fed and
destroyed by MediaAttachment.detach a few hundred times, in a child process, so that a crash fails the
test instead of killing pytest. The old teardown crashed this within 200 ports every time (5 of 5).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

PORTS = 300


def churn(ports: int) -> None:
    """Run in the child: make, feed and detach `ports` ports while the bridge ticks."""
    import gc

    import pjsua2 as pj

    from callbot.engine import Ring
    from callbot.sip._pcm import MediaPump
    from callbot.sip.media_port import MediaAttachment, _RingPort

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = cfg.logConfig.consoleLevel = 0
    cfg.uaConfig.threadCnt = 0
    cfg.medConfig.clockRate = cfg.medConfig.sndClockRate = 16000
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    ep.libStart()
    busy = threading.Event()

    def contend_for_the_gil() -> None:
        while not busy.is_set():
            pass

    threading.Thread(target=contend_for_the_gil, daemon=True).start()
    tone = pj.ToneGenerator()
    tone.createToneGenerator(16000, 1)
    desc = pj.ToneDesc()
    desc.freq1, desc.freq2, desc.on_msec, desc.off_msec = 440, 0, 1000, 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, 16000, 1, 20000, 16)
    fed = 0
    for i in range(ports):
        pump = MediaPump(Ring(4096, "int16"), Ring(4096, "int16"), 320)
        port = _RingPort(pump)
        port.createPort(f"churn{i}", fmt)
        tone.startTransmit(port)
        port.startTransmit(ep.audDevManager().getPlaybackDevMedia())
        deadline = time.monotonic() + 2.0
        while pump.frames_received < 2 and time.monotonic() < deadline:
            ep.libHandleEvents(1)
        fed += pump.frames_received >= 2
        attachment = MediaAttachment(tone, port, pump, None)
        del port
        attachment.detach()
    busy.set()
    del tone
    gc.collect()
    ep.libDestroy()
    print(f"fed {fed} of {ports}", flush=True)


def test_ports_destroyed_while_the_bridge_ticks_them_leave_the_process_whole():
    child = subprocess.run([sys.executable, __file__, str(PORTS)], capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, f"rc {child.returncode}\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}"
    # every port had the tone reach it before it was destroyed: the race was really run each time
    assert f"fed {PORTS} of {PORTS}" in child.stdout, child.stdout


if __name__ == "__main__":
    churn(int(sys.argv[1]))
