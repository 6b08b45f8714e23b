"""The live link and stream without SIP: app/web_link.py over a real EventBus and a real CallRouter with
the echo engine (a call opened as the endpoint opens one, with no SIP side to hang it up), the panel
served by uvicorn (web/server.py) over a real SQLite store, read over HTTP as a browser's EventSource
reads it. What the SIP test (tests/test_web_live.py) cannot make cheaply: the bot's text (the echo line
says none), the recognizer's guesses replaced by its final words, a stream's caps, a browser going
away, `callbot web` alone."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import types

import httpx
import pytest

from callbot.app.calls import CallRouter
from callbot.app.event_bus import EventBus
from callbot.app.web_link import ServeWebLink
from callbot.engine.contract import BotText, CallerWords, FlowTransition
from callbot.engine.serving.echo import EchoEngine
from callbot.sip.call_record import CallRecord
from callbot.store.call_store import CallStore
from callbot.web.live import MAX_STREAMS_PER_USER, LiveStream, Streams
from callbot.web.serve_link import sse
from callbot.web.server import WebServer
from callbot.web.users import User, Users
from tests.sip_peers import eventually, free_port

pytestmark = pytest.mark.timeout(60)
PW = "units-password-1"


class Reader:
    """/live/events read on a thread, line by line, as an EventSource does."""

    def __init__(self, client: httpx.Client):
        self.updates: list[dict] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self.response: httpx.Response | None = None
        threading.Thread(target=self._read, args=(client,), daemon=True).start()

    def _read(self, client) -> None:
        try:
            with client.stream("GET", "/live/events", timeout=httpx.Timeout(10, read=30)) as r:
                self.response, self.status = r, r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.updates.append(json.loads(line[6:]))
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def of(self, kind: str) -> list[dict]:
        return [u for u in list(self.updates) if u["type"] == kind]


def _raw_stream(port: int, client: httpx.Client) -> socket.socket:
    """/live/events on a socket of our own (with the client's session), read up to its snapshot."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    cookie = "; ".join(f"{c.name}={c.value}" for c in client.cookies.jar)
    sock.sendall(f"GET /live/events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode())
    got = b""
    while b'"type":"snapshot"' not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    return sock


def _client(base: str, name: str) -> httpx.Client:
    c = httpx.Client(base_url=base, timeout=10)
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"csrf": token, "name": name, "password": PW}).status_code == 303
    return c


@pytest.fixture
def store_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    with CallStore(url) as store:
        users = Users(store)
        for name, role, tenant in (("ada", "admin", None), ("sue", "supervisor", "acme"), ("bea", "supervisor", "beta"),
                                   ("vic", "viewer", "acme")):
            users.add(name, role, PW, tenant=tenant)
    return url


@pytest.fixture
def serve_side():
    """What app/web_link.py reads of serve: its CallRouter (the echo engine behind it) and its bus."""
    engine, bus = EchoEngine(), EventBus()
    router = CallRouter(engine)
    engine.on_event = bus.publish
    try:
        yield types.SimpleNamespace(router=router, bus=bus, engine=engine)
    finally:
        bus.close()
        engine.close()


def _open(router: CallRouter, call_id: str, tenant: str):
    record = CallRecord(call_id=call_id, direction="inbound", account="line", local_uri="sip:bot@127.0.0.1",
                        remote_uri="sip:caller@127.0.0.1", start=1.0e9, caller="+15550100", clock_rate=16000,
                        labels={"tenant": tenant})
    return router.open_session(record), record


def test_text_speech_state_and_hang_up_reach_only_the_tenants_streams(store_url, serve_side):
    link = ServeWebLink(serve_side).start()
    web = WebServer.start(store_url, "127.0.0.1", free_port(socket.SOCK_STREAM), link=link)
    base = f"http://127.0.0.1:{web.port}"
    sue, bea = _client(base, "sue"), _client(base, "bea")
    try:
        acme, beta = Reader(sue), Reader(bea)
        eventually(lambda: acme.of("snapshot") and beta.of("snapshot"), 10, "the snapshots")
        assert acme.response.headers["content-type"].startswith("text/event-stream")
        session, record = _open(serve_side.router, "call-1@acme", "acme")
        bus = serve_side.bus
        for piece in ("Hello", ", how", " can I help?"):
            bus.publish(BotText(call_id="call-1@acme", t_ms=100.0, piece=piece))
        bus.publish(CallerWords(call_id="call-1@acme", t_ms=900.0, text="i want", final=False, start_ms=0, end_ms=1))
        bus.publish(CallerWords(call_id="call-1@acme", t_ms=1200.0, text="i want an agent", final=True, start_ms=0,
                                end_ms=2))
        bus.publish(FlowTransition(call_id="call-1@acme", t_ms=1300.0, flow="support", from_state="greet",
                                   to_state="menu", reason="next"))
        eventually(lambda: acme.of("state"), 10, "the flow's move on acme's stream")
        [call] = link.calls()
        assert [(x.leg, x.text, x.final) for x in call.lines] == [("bot", "Hello, how can I help?", True),
                                                                 ("caller", "i want an agent", True)]
        assert call.state == "menu" and call.tenant == "acme" and call.remote == "+15550100"
        assert [u["call"]["call_id"] for u in acme.of("call")] == ["call-1@acme"]
        lines = acme.of("line")
        assert [(u["index"], u["text"], u["final"]) for u in lines] == [
            (0, "Hello", True), (0, "Hello, how", True), (0, "Hello, how can I help?", True),
            (1, "i want", False), (1, "i want an agent", True)]
        page = sue.get("/live").text  # rendered on the server too (and escaped)
        assert 'data-call-id="call-1@acme"' in page and "i want an agent" in page and "Hang up" in page
        # no SIP side here: the hang-up cannot be done, and says so
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        refused = sue.post("/live/call-1@acme/hangup", data={"csrf": token})
        assert refused.status_code == 409 and "no SIP endpoint" in refused.text

        serve_side.router.close_session(session, record)
        eventually(lambda: acme.of("ended"), 10, "the call's end on acme's stream")
        assert link.calls() == []
        bus.publish(CallerWords(call_id="call-1@acme", t_ms=2000.0, text="late words", final=True, start_ms=0, end_ms=1))
        bus.publish(FlowTransition(call_id="call-9@acme", t_ms=1.0, flow="f", from_state="a", to_state="b", reason="r"))
        eventually(lambda: not any(s.pending for s in bus.subscriptions), 10, "the bus drained")
        assert link.calls() == []  # a late event makes no ghost call
        assert beta.of("snapshot")[0]["calls"] == [] and len(beta.updates) == 1  # beta saw nothing of acme's
        link.close()  # serve stopping: every stream ends
        assert acme.ended.wait(10) and beta.ended.wait(10)
        assert acme.of("closed") and beta.of("closed")
    finally:
        sue.close(), bea.close()
        link.close()
        web.stop()


def test_streams_are_capped_per_user_and_freed_when_the_browser_goes(store_url, serve_side):
    link = ServeWebLink(serve_side).start()
    web = WebServer.start(store_url, "127.0.0.1", free_port(socket.SOCK_STREAM), link=link)
    base = f"http://127.0.0.1:{web.port}"
    clients = [_client(base, "sue") for _ in range(MAX_STREAMS_PER_USER + 1)]
    try:
        gone = _raw_stream(web.port, clients[0])  # a browser's connection, which it will drop
        readers = [Reader(c) for c in clients[1:MAX_STREAMS_PER_USER]]
        eventually(lambda: all(r.of("snapshot") for r in readers), 10, "the streams open")
        assert len(link._feeds) == MAX_STREAMS_PER_USER
        assert clients[-1].get("/live/events").status_code == 429
        ada = _client(base, "ada")  # another user has streams of their own
        other = Reader(ada)
        eventually(lambda: other.of("snapshot"), 10, "another user's stream")
        assert len(link._feeds) == MAX_STREAMS_PER_USER + 1
        gone.shutdown(socket.SHUT_RDWR)  # the browser goes: its stream ends at once, not at the next write
        gone.close()
        eventually(lambda: len(link._feeds) == MAX_STREAMS_PER_USER, 10, "the gone browser's feed dropped")
        last = Reader(clients[-1])
        eventually(lambda: last.of("snapshot"), 10, "a stream in the freed place")
        ada.close()
    finally:
        for c in clients:
            c.close()
        link.close()
        web.stop()


def test_the_panel_without_serve_says_so(store_url):
    web = WebServer.start(store_url, "127.0.0.1", free_port(socket.SOCK_STREAM))
    base = f"http://127.0.0.1:{web.port}"
    ada, vic = _client(base, "ada"), _client(base, "vic")
    try:
        assert 'id="no-serve"' in ada.get("/live").text and "callbot serve" in ada.get("/live").text
        assert ada.get("/live/events").status_code == 404
        token = re.search(r'name="csrf" value="([^"]+)"', ada.get("/live").text).group(1)
        assert ada.post("/live/x/hangup", data={"csrf": token}).status_code == 404
        system = ada.get("/system")
        assert system.status_code == 200 and "Serve is not attached" in system.text
        assert re.search(r"<th>database</th><td>sqlite</td>", system.text)
        assert vic.get("/system").status_code == 403
        assert httpx.get(base + "/live", timeout=10).status_code == 303  # no session, no page
    finally:
        ada.close(), vic.close()
        web.stop()


def test_server_sent_event_lines():
    assert sse({"type": "line", "text": "two\nlines"}) == b'data: {"type":"line","text":"two\\nlines"}\n\n'
    assert sse(comment="keep-alive") == b": keep-alive\n\n"
    streams = Streams(per_user=2, total=3)
    assert streams.reserve("a") and streams.reserve("a") and not streams.reserve("a")
    assert streams.reserve("b") and not streams.reserve("c")  # the process's cap
    streams.release("a")
    assert streams.reserve("c") and streams.count() == 3 and streams.count("a") == 1


class Browser:
    """The ASGI side of one /live/events request, driven by the test: `send` records what the stream
    writes and, while `hold` is clear, waits (a browser that does not read); `go` is the browser leaving."""

    def __init__(self):
        self.messages: list[dict] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.messages.append(message)
        await self.hold.wait()

    def updates(self) -> list[dict]:
        out = []
        for m in self.messages:
            body = m.get("body", b"")
            out += [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        return out


def bot_line_after_resnapshot(updates: list[dict]) -> str | None:
    """The first line's text as the browser shows it after the second snapshot: that snapshot's, then
    any line updates that came after it (None before the second snapshot)."""
    marks = [i for i, u in enumerate(updates) if u["type"] == "snapshot"]
    if len(marks) < 2:
        return None
    lines = updates[marks[1]]["calls"][0]["lines"] if updates[marks[1]]["calls"] else []
    text = lines[0]["text"] if lines else None
    for u in updates[marks[1] + 1:]:
        if u["type"] == "line" and u["index"] == 0:
            text = u["text"]
    return text


def test_a_browser_that_falls_behind_gets_a_snapshot_and_a_disabled_user_is_cut_off(serve_side):
    """LiveStream under asyncio with the test as the ASGI server: a queue of 2 updates overflows while the
    browser does not read, and what it lost comes back as one fresh snapshot; a user no longer allowed
    is cut off at the next keep-alive; serve stopping while a browser's queue is full still ends its stream."""
    link = ServeWebLink(serve_side).start()
    user = User(name="sue", role="supervisor", tenant="acme")
    session, record = _open(serve_side.router, "call-2@acme", "acme")
    allowed = {"yes": True}

    async def still_allowed() -> bool:
        return allowed["yes"]

    async def run() -> tuple[list[dict], list[dict]]:
        slow = Browser()
        stream = LiveStream(link, user, Streams(), still_allowed, keepalive_s=3600, queue=2)
        task = asyncio.ensure_future(stream(HTTP_SCOPE, slow.receive, slow.send))
        while len(slow.messages) < 2:  # the headers, the first snapshot
            await asyncio.sleep(0.01)
        slow.hold.clear()  # the browser stops reading: the stream waits on its next write
        # a feed subscribed after the stream's is told after it: once it has all five, so has the stream
        after: list[dict] = []
        feed = link.subscribe(after.append)
        for piece in ("one", " two", " three", " four", " five"):
            serve_side.bus.publish(BotText(call_id="call-2@acme", t_ms=1.0, piece=piece))
        while len(after) < 5:
            await asyncio.sleep(0.01)
        feed.close()
        slow.hold.set()
        # the fresh snapshot is taken when the stream resumes after the loss, which may be before the last
        # piece reached the link: that piece then follows it as a line update
        while bot_line_after_resnapshot(slow.updates()) != "one two three four five":
            await asyncio.sleep(0.01)
        slow.gone.set()
        await asyncio.wait_for(task, 10)
        # a user disabled meanwhile: cut off at the next keep-alive
        cut = Browser()
        allowed["yes"] = False
        quick = LiveStream(link, user, Streams(), still_allowed, keepalive_s=0.05)
        await asyncio.wait_for(quick(HTTP_SCOPE, cut.receive, cut.send), 10)
        # serve stopping while a browser's queue is full: the stream still ends
        full = Browser()
        last = LiveStream(link, user, Streams(), still_allowed, keepalive_s=3600, queue=1)
        task = asyncio.ensure_future(last(HTTP_SCOPE, full.receive, full.send))
        while len(full.messages) < 2:
            await asyncio.sleep(0.01)
        full.hold.clear()
        after.clear()
        feed = link.subscribe(after.append)
        for piece in (" six", " seven", " eight"):  # one taken (its write waits), one queued, one lost
            serve_side.bus.publish(BotText(call_id="call-2@acme", t_ms=2.0, piece=piece))
        while len(full.messages) < 3:  # the stream waits on a write: what comes now stays queued
            await asyncio.sleep(0.01)
        for piece in (" nine", " ten"):  # the queue full again
            serve_side.bus.publish(BotText(call_id="call-2@acme", t_ms=3.0, piece=piece))
        while len(after) < 5:
            await asyncio.sleep(0.01)
        link.close()
        full.hold.set()
        await asyncio.wait_for(task, 10)
        assert full.updates()[-1] == {"type": "closed"}
        return slow.updates(), cut.updates()

    try:
        slow, cut = asyncio.run(run())
    finally:
        serve_side.router.close_session(session, record)
        link.close()
    snapshots = [u for u in slow if u["type"] == "snapshot"]
    assert len(snapshots) == 2
    [call] = snapshots[1]["calls"]
    assert [(x["leg"], x["final"]) for x in call["lines"]] == [("bot", True)]
    assert bot_line_after_resnapshot(slow) == "one two three four five"
    assert [u["type"] for u in cut] == ["snapshot", "closed"]


HTTP_SCOPE = {"type": "http", "method": "GET", "path": "/live/events", "headers": []}
