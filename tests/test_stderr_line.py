"""engine/serving/stderr_line.say: lines written from many threads at once arrive whole (print() writes the
text and its newline apart, and CI once saw two threads' lines of the model service joined into one)."""
import re
import subprocess
import sys

WRITER = """
import threading
from callbot.engine.serving.stderr_line import say

def write(k):
    for i in range(2000):
        say(f"thread {k} line {i} " + "x" * (i % 97))

threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_lines_from_eight_threads_arrive_whole():
    out = subprocess.run([sys.executable, "-c", WRITER], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.split("\n")
    assert lines[-1] == ""  # the last line ended too
    whole = re.compile(r"thread (\d) line (\d+) x*")
    seen = set()
    for line in lines[:-1]:
        m = whole.fullmatch(line)
        assert m and len(line) == len(f"thread {m[1]} line {m[2]} ") + int(m[2]) % 97, line
        seen.add((m[1], m[2]))
    assert len(seen) == 8 * 2000
