"""The console script is installed and answers --help without importing heavy modules."""
import pathlib
import subprocess
import sys


def test_console_script_help():
    # the script sits beside the interpreter of the environment the package was installed into
    exe = pathlib.Path(sys.executable).parent / "callbot"
    assert exe.exists(), f"console script `callbot` not installed at {exe}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "phone calls" in out.stdout


def test_no_command_is_usage_error():
    out = subprocess.run([sys.executable, "-m", "callbot.app.cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
