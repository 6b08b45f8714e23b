"""Accounts registered at kamailio (digest auth): right and wrong password, refresh, unregister, calls."""
from __future__ import annotations

import pathlib
import time

import pytest
from tests.sip_peers import Kamailio, PjsuaPeer

from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import (CallConfirmed, CallEnded, CallRejected, IncomingCall, RegistrationChanged,
                                RegistrationFailed)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kamailio(tmp_path_factory):
    k = Kamailio({"bot": "s3cret", "alice": "alicepw", "fast": "fastpw", "solo": "solopw",
                  "proxied": "proxiedpw"}, tmp_path_factory.mktemp("kamailio"))
    yield k
    k.close()


def test_shutdown_unregisters(kamailio, tmp_path: pathlib.Path):
    # first in the module: it needs its own endpoint before the module's `bot` exists (one per process)
    cfg = EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
                         accounts=(AccountConfig(name="solo", user="solo", registrar=kamailio.uri,
                                                 password="solopw"),))
    with PjsuaPeer(user="alice", registrar=kamailio.uri, password="alicepw", log_dir=tmp_path) as alice:
        alice.expect("reg", code=200)
        with Endpoint(cfg) as ep:
            ep.wait_for(RegistrationChanged, account="solo", registered=True)
            reachable = alice.call(f"sip:solo@127.0.0.1:{kamailio.port}")
            ep.wait_for(CallConfirmed, call_id=reachable)
        gone = ep.wait_for(RegistrationChanged, account="solo", registered=False)
        assert gone.code == 200
        assert alice.expect("disconnected", call_id=reachable)
        # the registrar no longer knows where "solo" is
        after = alice.call(f"sip:solo@127.0.0.1:{kamailio.port}")
        assert alice.expect("disconnected", call_id=after)["code"] == 404


@pytest.fixture(scope="module")
def bot(kamailio):
    cfg = EndpointConfig(
        transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
        accounts=(
            AccountConfig(name="good", user="bot", registrar=kamailio.uri, password="s3cret"),
            AccountConfig(name="bad", user="bot", registrar=kamailio.uri, password="wrong"),
            AccountConfig(name="fast", user="fast", registrar=kamailio.uri, password="fastpw",
                          expires_s=3, refresh_before_s=1),
            AccountConfig(name="direct", user="direct"),
            AccountConfig(name="proxied", user="proxied", registrar=kamailio.uri, password="proxiedpw",
                          proxy=kamailio.uri),
        ),
    )
    with Endpoint(cfg) as ep:
        yield ep


def test_right_password_registers(bot):
    ev = bot.wait_for(RegistrationChanged, account="good")
    assert (ev.code, ev.registered) == (200, True)
    assert ev.expires_s > 0
    assert bot.accounts["good"].registered


def test_wrong_password_is_a_clear_error_and_endpoint_keeps_running(bot, kamailio):
    ev = bot.wait_for(RegistrationFailed, account="bad")
    assert ev.code == 401
    assert "'bad'" in ev.message and "refused by registrar" in ev.message and kamailio.uri in ev.message
    assert not bot.accounts["bad"].registered
    assert bot.running
    assert not [e for e in bot.history(RegistrationChanged) if e.account == "bad" and e.registered]


def test_registration_is_refreshed_before_expiry(bot):
    first = bot.wait_for(RegistrationChanged, account="fast", registered=True)
    assert first.expires_s <= 3
    # a second 200 for the same account can only come from a refresh (3 s granted, renewed 1 s early)
    again = bot.wait_for(RegistrationChanged, timeout=15, after=first.at + 0.001, account="fast", registered=True)
    assert again.at > first.at


def test_call_through_registrar_reaches_registered_account(bot, kamailio, tmp_path: pathlib.Path):
    bot.wait_for(RegistrationChanged, account="good", registered=True)
    with PjsuaPeer(user="alice", registrar=kamailio.uri, password="alicepw", log_dir=tmp_path) as alice:
        assert alice.expect("reg", code=200)
        t0 = time.monotonic()
        call_id = alice.call(f"sip:bot@127.0.0.1:{kamailio.port}")
        incoming = bot.wait_for(IncomingCall, call_id=call_id, after=t0)
        assert incoming.account in ("good", "bad")  # both share the user "bot"; pjsua picks one
        bot.wait_for(CallConfirmed, call_id=call_id)
        alice.send("hangup", call_id=call_id)
        assert bot.wait_for(CallEnded, call_id=call_id).cause == "remote"


def test_direct_account_beside_registered_ones(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="carol", log_dir=tmp_path) as carol:
        call_id = carol.call(bot.account_uri("direct"))
        assert bot.wait_for(IncomingCall, call_id=call_id).account == "direct"
        bot.wait_for(CallConfirmed, call_id=call_id)
        bot.hangup(call_id)
        carol.expect("disconnected", call_id=call_id)


def test_registered_account_refuses_invites_not_from_its_registrar(bot, tmp_path: pathlib.Path):
    # straight to the endpoint's socket, addressed to the registered user: 403, no call
    with PjsuaPeer(user="mallory", log_dir=tmp_path) as mallory:
        port = bot.transports["udp"].port
        cid = mallory.call(f"sip:fast@127.0.0.1:{port}")
        assert mallory.expect("disconnected", call_id=cid)["code"] == 403
        rejected = bot.wait_for(CallRejected, code=403)
        assert rejected.account == "fast" and "not from its registrar" in rejected.reason
        assert cid not in bot.calls()


def test_outbound_call_through_the_proxy_reaches_a_registered_user(bot, kamailio, tmp_path: pathlib.Path):
    bot.wait_for(RegistrationChanged, account="proxied", registered=True)
    with PjsuaPeer(user="alice", registrar=kamailio.uri, password="alicepw", log_dir=tmp_path) as alice:
        alice.expect("reg", code=200)
        # no port, no host of alice's: only the registrar knows where "alice" is
        cid = bot.dial("sip:alice@127.0.0.1", account="proxied")
        assert alice.expect("incoming", call_id=cid)
        bot.wait_for(CallConfirmed, call_id=cid)
        bot.hangup(cid)
        alice.expect("disconnected", call_id=cid)


@pytest.mark.parametrize("source, trusted, check_port, ok", [
    ("127.0.0.1:5070", "127.0.0.1", True, True),  # no port given: any port of the host
    ("127.0.0.1:5070", "127.0.0.1:5070", True, True),
    ("127.0.0.1:5071", "127.0.0.1:5070", True, False),
    ("127.0.0.1:40000", "127.0.0.1:5070", False, True),  # TCP/TLS: the host only
    ("127.0.0.2:5070", "127.0.0.1:5070", False, False),
    ("[::1]:5060", "[::1]", True, True),
    ("[::1]:5061", "[::1]:5060", True, False),
])
def test_trusted_source_matching(source, trusted, check_port, ok):
    from callbot.sip.account import _source_matches

    assert _source_matches(source, trusted, check_port) is ok


def test_outbound_call_answers_the_proxy_challenge_and_a_wrong_password_fails(bot, kamailio, tmp_path):
    bot.wait_for(RegistrationChanged, account="proxied", registered=True)
    with PjsuaPeer(user="alice", registrar=kamailio.uri, password="alicepw", log_dir=tmp_path) as alice:
        alice.expect("reg", code=200)
        # kamailio challenges both calls (407); pjsip answers with the account's digest
        good = bot.dial(f"sip:alice@127.0.0.1:{kamailio.port}", account="proxied")
        bot.wait_for(CallConfirmed, call_id=good)
        bot.hangup(good)
        bot.wait_for(CallEnded, call_id=good)
        # "bad" has the wrong password: the challenge comes back until pjsip gives up
        bad = bot.dial(f"sip:alice@127.0.0.1:{kamailio.port}", account="bad")
        ended = bot.wait_for(CallEnded, call_id=bad)
        assert (ended.cause, ended.code) == ("failed", 407)
        assert not alice.all("incoming", call_id=bad)


def test_a_registrar_named_by_host_name_is_trusted_by_its_addresses():
    # pjsip names an INVITE's source by IP: "localhost:5060" must match 127.0.0.1:5060
    from callbot.sip.account import _source_matches, resolve_trusted

    trusted = resolve_trusted(("localhost:5060", "127.0.0.2", "[::1]:5070"))
    assert "127.0.0.1:5060" in trusted and "127.0.0.2" in trusted and "[::1]:5070" in trusted
    assert any(_source_matches("127.0.0.1:5060", t) for t in trusted)
    assert not any(_source_matches("127.0.0.1:5999", t) for t in trusted if t.endswith(":5060"))
