"""The /metrics endpoint holds up against held, idle and slow connections: one thread, a bounded number of
connections, each closed after its timeout, and scrapes answered throughout (issue 11, point 6)."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from callbot.app.metrics import Metrics
from callbot.app.metrics_server import MetricsServer

HELD = 300


def _threads() -> int:
    """Threads of this process, as the OS counts them (Python's own count misses native ones)."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()


def _scrape(port: int, path: str = "/metrics", timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return resp.read().decode()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset), False while it is open."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _wait_all_closed(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets still open when `timeout` runs out (polled, so a fast server passes fast)."""
    open_ = list(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        open_ = [s for s in open_ if not _closed_by_peer(s)]
        if open_:
            time.sleep(0.05)
    return open_


@contextlib.contextmanager
def _server(**kw):
    registry = CollectorRegistry()
    Counter("probe_total", "a counter to find in the answer", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0, **kw)
    try:
        yield server
    finally:
        server.close()


def _connect(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        socks.append(s)
    return socks


def test_held_connections_cost_no_threads_and_scrapes_still_answer():
    before = _threads()
    with _server(timeout_s=1.0) as server:
        port = server.address[1]
        assert _threads() <= before + 1  # the loop's one thread
        socks = _connect(port, HELD)
        try:
            assert _threads() <= before + 1
            assert server.connections <= server.max_connections
            for _ in range(3):  # held connections never lock a scraper out
                assert "probe_total 3.0" in _scrape(port)
            assert _threads() <= before + 1
            # none is kept past the timeout (the cap already dropped the oldest)
            still_open = _wait_all_closed(socks, timeout=1.0 + 3.0)
            assert not still_open, f"{len(still_open)} of {HELD} idle connections still open"
            assert server.connections == 0
        finally:
            for s in socks:
                s.close()
        assert "probe_total 3.0" in _scrape(port)


def test_a_trickling_client_is_closed_at_the_timeout():
    """A slowloris: a byte of request head now and then never earns more time than the timeout."""
    with _server(timeout_s=1.0) as server:
        s = socket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
        s.setblocking(False)
        start = time.monotonic()
        try:
            closed = False
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    s.send(bytes([byte]))
                if _closed_by_peer(s):
                    closed = True
                    break
                time.sleep(0.05)
                assert time.monotonic() - start < 5, "still open 5 s after a 1 s timeout"
            assert closed
            assert 0.9 <= time.monotonic() - start < 3
        finally:
            s.close()


def test_answers_and_refusals():
    with _server() as server:
        port = server.address[1]
        assert "probe_total 3.0" in _scrape(port, "/metrics?name[]=probe_total")
        assert "probe_total 3.0" in _scrape(port, "/")
        with pytest.raises(urllib.error.HTTPError) as info:
            _scrape(port, "/nothing")
        assert info.value.code == 404
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 405
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert b"application/openmetrics-text" in answer and answer.rstrip().endswith(b"# EOF")


def test_metrics_serve_binds_and_closes():
    m = Metrics()
    host, port = m.serve("127.0.0.1:0")
    assert host == "127.0.0.1" and port > 0
    assert "callbot_calls_active 0.0" in _scrape(port)
    with pytest.raises(OSError):  # the port is taken: the caller's error, raised at once
        Metrics().serve(f"127.0.0.1:{port}")
    m.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
