"""MLX never loads in the SIP process, pjsua2 never in the inference process (docs/architecture.md,
"Two processes"), checked
on the processes themselves, not only on the source (tests/test_import_contracts.py checks the source):

- a fresh interpreter that imports the SIP side's modules has no `mlx` module; one that imports what the
  inference child imports has no `pjsua2` (the first import of the other is traced, to name its chain);
- `callbot serve` with the tiny model, while it answers a real call from a pjsua2 peer on 127.0.0.1: the
  serve process's sys.modules hold no mlx, its memory maps no MLX library, and the inference child's maps
  no pjsua2 library (Linux /proc; macOS has none, so there only the sys.modules part runs).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from tests.sip_peers import PjsuaPeer, _Lines, eventually, free_port, serve_config, stop_process

pytestmark = pytest.mark.timeout(240)

HAS_PROC = pathlib.Path("/proc/self/maps").exists()
NO_PROC = "no /proc on this system (macOS): memory maps and child processes are not read; sys.modules is"

SIP_SIDE = ["callbot.sip.media_port", "callbot.sip.endpoint", "callbot.engine.audio", "callbot.engine.contract",
            "callbot.engine.serving.inference_process", "callbot.app.recording", "callbot.app.serve"]
# what the inference child imports: its entry point, the model runner, and the modules of the setup that
# app/model_engine.py hands it (a functools.partial of a function there, which runs app/model_setup.py)
INFERENCE_SIDE = ["callbot.engine.serving.inference_process", "callbot.engine.serving.runner",
                  "callbot.engine.model.session", "callbot.app.model_engine", "callbot.app.model_setup",
                  "callbot.app.settings"]

# Imports the modules named in argv in a fresh interpreter; prints which of mlx / pjsua2 are in
# sys.modules and, for each, the stack (our frames only) of its first import.
TRACE_IMPORTS = r"""
import importlib, json, sys, traceback

class FirstImport:
    seen = {}
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("mlx", "pjsua2") and top not in self.seen:
            self.seen[top] = [f"{f.filename}:{f.lineno} {f.line}" for f in traceback.extract_stack()[:-1]
                              if not f.filename.startswith("<")]
        return None

sys.meta_path.insert(0, FirstImport())
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted({k.partition(".")[0] for k in sys.modules} & {"mlx", "pjsua2"})
print(json.dumps({"loaded": loaded, "chains": FirstImport.seen}))
"""


def _trace_imports(modules: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", TRACE_IMPORTS, *modules], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _chain(report: dict, top: str) -> str:
    return "\n".join(report["chains"].get(top, ["(no chain recorded)"]))


def test_sip_side_modules_load_no_mlx():
    report = _trace_imports(SIP_SIDE)
    assert "mlx" not in report["loaded"], f"mlx imported by the SIP side's modules:\n{_chain(report, 'mlx')}"
    assert "pjsua2" in report["loaded"]  # the trace is live: the SIP modules did load pjsua2


def test_inference_side_modules_load_no_pjsua2():
    report = _trace_imports(INFERENCE_SIDE)
    assert "pjsua2" not in report["loaded"], f"pjsua2 imported on the inference side:\n{_chain(report, 'pjsua2')}"
    assert "mlx" in report["loaded"]  # the trace is live: the runner did load MLX


# --- `callbot serve` answering a call --------------------------------------------------------------

# `callbot serve` as the CLI runs it (callbot.app.cli.main in the main thread), plus one thread that, when
# the test creates the file argv[1], writes this process's sys.modules (and the stack of mlx's first import,
# if any) to argv[2]: no signal, no debugger.
SERVE_WITH_MODULES_PROBE = r"""
import json, os, sys, threading, time, traceback

class FirstMlxImport:
    chain = None
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "mlx" and FirstMlxImport.chain is None:
            FirstMlxImport.chain = [f"{f.filename}:{f.lineno} {f.line}" for f in traceback.extract_stack()[:-1]
                                    if not f.filename.startswith("<")]
        return None

sys.meta_path.insert(0, FirstMlxImport())

def probe(request, out):
    while not os.path.exists(request):
        time.sleep(0.05)
    with open(out + ".tmp", "w") as f:
        json.dump({"modules": sorted(sys.modules), "mlx_chain": FirstMlxImport.chain}, f)
    os.replace(out + ".tmp", out)

threading.Thread(target=probe, args=sys.argv[1:3], name="modules-probe", daemon=True).start()
from callbot.app.cli import main
sys.exit(main(sys.argv[3:]))
"""

MLX_LIBRARY = re.compile(r"(^|/)(mlx|mlx_[^/]*)/|(^|/)libmlx[^/]*$")  # mlx/core*.so, mlx/lib/libmlx.so, mlx_cpu.libs/
PJSUA2_LIBRARY = re.compile(r"(^|/)_pjsua2[^/]*$|(^|/)pjsua2(_python\.libs)?/")


def _mapped_files(pid: int) -> set[str]:
    """The files mapped into process `pid`'s memory."""
    with open(f"/proc/{pid}/maps") as f:
        return {parts[5] for parts in (line.rstrip("\n").split(maxsplit=5) for line in f) if len(parts) == 6}


def _children(pid: int) -> dict[int, list[str]]:
    """The live children of `pid` -> their argv (from /proc/*/stat's ppid)."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])  # after "(comm)": state, ppid
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def _inference_child(serve_pid: int) -> int | None:
    """The inference process: serve's multiprocessing "spawn" child (not its resource tracker)."""
    spawned = [pid for pid, argv in _children(serve_pid).items() if "--multiprocessing-fork" in argv]
    return spawned[0] if len(spawned) == 1 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not running code any more
    return not HAS_PROC or pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_assets import write_tiny_model_for_serve

    return write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex"))


@pytest.fixture(scope="module")
def serving_a_call(tmp_path_factory, tiny_model):
    """Runs `callbot serve` (tiny model, inference in its own process), has a pjsua2 peer call it, and
    while the call is up collects: the serve process's sys.modules and both processes' mapped files."""
    tmp = tmp_path_factory.mktemp("isolation")
    model_dir, arch = tiny_model
    sip_port = free_port()
    cfg = serve_config(tmp, sip_port, recordings_dir=str(tmp / "calls"), tail=f"""[model]
path = "{model_dir}"
architecture = "{arch}"
quantization = "none"
download = false
[[bots]]
persona = "You answer the phone."
[recognizer]
engine = "none"  # its child is another spawn child of serve; this test is about the model's
""")
    request, modules_file = tmp / "modules.request", tmp / "modules.json"
    evidence: dict = {}
    with open(tmp / "serve.stdout", "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_MODULES_PROBE, str(request), str(modules_file),
                                 "serve", "--config", str(cfg)],
                                cwd=tmp, stdout=stdout, stderr=subprocess.PIPE, text=True)
    err = _Lines(proc.stderr, tmp / "serve.stderr")
    child = None
    try:
        # the model is loaded and warmed up in the child when serve says "listening"; it may also give up
        eventually(lambda: proc.poll() is not None or any("listening" in line for line in err.lines), 120,
               "serve listening")
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{''.join(err.lines)[-3000:]}"
        if HAS_PROC:
            child = eventually(lambda: _inference_child(proc.pid), 10, "the inference child among serve's children")
        with PjsuaPeer(user="isolation", log_dir=tmp) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_id, timeout=30)
            # the call is up: read both processes now
            request.touch()
            evidence["serve_modules"] = json.loads(eventually(lambda: modules_file.exists() and modules_file.read_text(),
                                                          10, "serve's sys.modules written"))
            if HAS_PROC:
                evidence["serve_maps"] = _mapped_files(proc.pid)
                evidence["child_maps"] = _mapped_files(child)
                evidence["child_pid"] = child
            assert proc.poll() is None, "serve died during the call"
            peer.send("hangup", call_id=call_id)
            peer.expect("disconnected", call_id=call_id, timeout=15)
        evidence["serve_exit"] = stop_process(proc, timeout=30, sig=signal.SIGTERM)
        if child is not None:
            eventually(lambda: not _alive(child), 15, "the inference child gone after serve stopped")
    finally:
        stop_process(proc, timeout=10, sig=signal.SIGKILL)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)  # never left behind, whatever serve did
    evidence["stderr"] = "".join(err.lines)
    return evidence


def test_serve_process_has_no_mlx_module_during_a_call(serving_a_call):
    modules = serving_a_call["serve_modules"]["modules"]
    mlx = [m for m in modules if m == "mlx" or m.startswith("mlx.")]
    chain = "\n".join(serving_a_call["serve_modules"]["mlx_chain"] or [])
    assert not mlx, f"the SIP process holds {mlx[:3]}...; mlx was first imported here:\n{chain}"
    assert "pjsua2" in modules  # the probe read the right process


@pytest.mark.skipif(not HAS_PROC, reason=NO_PROC)
def test_serve_process_maps_no_mlx_library_during_a_call(serving_a_call):
    maps = serving_a_call["serve_maps"]
    assert not sorted(p for p in maps if MLX_LIBRARY.search(p)), "an MLX library is mapped in the SIP process"
    assert any(PJSUA2_LIBRARY.search(p) for p in maps)  # the maps are the SIP process's: pjsua2 is there


@pytest.mark.skipif(not HAS_PROC, reason=NO_PROC)
def test_inference_process_maps_no_pjsua2_library_during_a_call(serving_a_call):
    maps = serving_a_call["child_maps"]
    assert not sorted(p for p in maps if PJSUA2_LIBRARY.search(p)), "pjsua2 is mapped in the inference process"
    assert any(MLX_LIBRARY.search(p) for p in maps)  # the maps are the model's process: MLX is there


def test_serve_stopped_cleanly_after_the_call(serving_a_call):
    assert serving_a_call["serve_exit"] == 0, serving_a_call["stderr"][-3000:]
