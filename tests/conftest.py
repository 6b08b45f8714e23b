"""Fixtures more than one test file uses, and the markers each test gets from its file.

Markers (registered in pyproject.toml, checked with --strict-markers): `sip`, `model`, `slow`, given by
MARKS below per test file rather than by decorators in each file, so the suite's split is one table.
`pytest -m "not sip and not model and not slow"` runs the fast unit tests alone (docs/testing.md,
"Markers"). Helper modules (tests/sip_peers.py, tiny_lm.py, ...) are imported as `from tests.<name>
import ...` everywhere (docs/testing.md, "Helpers").
"""
from __future__ import annotations

import pytest

from callbot.app.calls import CallRouter
from callbot.engine.serving.echo import EchoEngine
from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.app.recording import Recorder

# test file (module name) -> its markers; "module::test" adds to one test. Times: the whole file on the
# 2-core CI machine class. A file that is not listed is a fast unit test, except test_sip_* (sip).
#   sip:   a real SIP stack runs: a pjsua2 endpoint, a peer process (pjsua2, baresip, SIPp, kamailio)
#          or `callbot serve`
#   model: the tiny MLX model steps, or the PyTorch reference (torch, moshi) runs
#   slow:  the file takes over ~10 s, or one of its tests over ~5 s
MARKS: dict[str, frozenset[str]] = {
    name: frozenset(marks.split()) for name, marks in {
        "test_analysis_host": "",  # 3 s: [analytics] settings, `callbot rules check`, serve refusing a broken rules file, the recorder's hook
        "test_analysis_host::test_the_host_analyses_a_final_call_into_the_store_and_beside_it": "slow",  # 4 s: a spawned pool, pocketsphinx post-call
        "test_analysis_host::test_a_worker_killed_mid_analysis_costs_that_call_only": "slow",  # 5 s: two spawned pools
        "test_analysis_host_serve": "sip slow",  # 25 s: `callbot serve` analysing a pjsua2 call, `callbot calls show/list/analyze`
        "test_cli_calls_analyze": "slow",  # 35 s: `callbot calls analyze` processes over two scripted calls
        "test_analytics_call": "slow",  # 20 s: analyze_call with pocketsphinx on 8 scripted calls, a spawned pool
        "test_analytics_metrics": "",  # hand-placed segments, pure functions
        "test_analytics_sip": "sip slow",  # 16 s: the example line called by pjsua2, its recording analysed
        "test_analytics_placed": "sip slow",  # 22 s: the example line, a scripted caller, every metric against what was placed
        "test_analytics_rules": "",  # rules files and their evaluation on hand-built analyses
        "test_analytics_transcript": "",  # words, turns, PII, VADER: no audio model
        "test_analytics_vad": "",  # 2 s: Silero's VAD on a scripted 16 s espeak-ng call
        "test_app_control": "sip slow",  # 32 s: `running_server` and a pjsua2 caller
        "test_batch_parity": "model slow",  # 13 s: batched LM streams against Kyutai's PyTorch LMModel
        "test_batch_sessions": "model",  # 7 s
        "test_bot_prepare": "model slow",  # 9 s: a bot prepared again while a call runs: on a thread, in the inference process, through the model service
        "test_bot_prepare_serve": "sip model slow",  # 21 s: `running_server` on the tiny model (thread, inference process): a persona and voice saved reach the next call, a broken voice kept out
        "test_batch_step": "model",  # 9 s
        "test_kv_cache": "model",  # 2 s: the tiny model prepares and steps
        "test_kv_context": "model slow",  # 16 s: calls past a bot's context, alone and batched
        "test_kv_quantized": "model slow",  # 20 s: 8- and 4-bit KV caches against float32, a batch
        "test_kv_fused": "",  # 1 s: fused quantized attention against dequantize-then-SDPA, layouts
        "test_kv_fused_model": "model slow",  # 90 s: fused KV attention in a head_dim-64 tiny model, batched
        "test_fullsize_checkpoint": "model",  # 3 s: the full-size writer at the tiny size, loaded and prompted
        "test_bytes_per_step": "model slow",  # 20 s: the 7B byte count's code against the tiny model's arrays
        "test_campaign_amd": "",  # 1 s: answering-machine detection on 33 scripted espeak-ng callees
        "test_campaign_api": "sip slow",  # 25 s: campaigns started, read, paused/resumed/stopped over HTTP (callbot calls api)
        "test_campaign_callerid": "sip slow",  # 20 s: caller ID in the INVITE (SIPp), variables at answer, a flow's hold
        "test_campaign_disk_full": "sip slow",  # 15 s: `callbot campaign run` with its state file on a tmpfs that fills
        "test_campaign_config": "",  # 3 s: campaign, list and DNC files; two `callbot campaign run` refusals
        "test_campaign_restart": "sip slow",  # 15 s: a dialer SIGKILLed mid-call, its attempts resolved from the call records
        "test_campaign_scheduler": "",  # the scheduler on an injected clock
        "test_campaign_state": "",  # SQLite state files, the restart rule
        "test_campaign_sip": "sip slow",  # 90 s: `callbot campaign run` against pjsua2 and SIPp callees, a SIGKILL
        "test_edge": "sip slow",  # 35 s: kamailio before `callbot serve`, a SIPp flood, held TCP connections
        "test_edge_netns": "sip slow",  # 25 s: calls in and out through the edge, the peer in a network namespace
        "test_edge_nodes": "sip slow",  # 35 s: a front edge over two `serve --edge --workers 2` nodes with echo services, 8 pjsua2 calls, a node stopped, a service stalled
        "test_edge_workers": "sip slow",  # 40 s: `serve --edge --workers`, 8 pjsua2 calls, a killed worker, a drain, nodes
        "test_edge_workers::test_the_model_engine_gets_one_model_service_for_all_workers": "model",  # the tiny model
        "test_flows_call": "sip slow",  # call flows on real calls: menus, DTMF, a REFER, webhooks
        "test_flows_model": "sip model slow",  # a flow on the tiny model in its own process
        "test_flows_transfer": "sip slow",  # 20 s: attended transfer from a flow, pjsua2 caller and agents
        "test_flows_speech": "sip slow",  # 30 s: the README's example line, espeak-ng prompts, the caller recognizer
        "test_import_contracts": "slow",  # 11 s: lint-imports runs 27 times
        "test_inference_process": "sip model slow",  # 90 s
        "test_latency_tools": "sip slow",  # 6 s: a real echo call
        "test_live_control": "model slow",  # 64 s
        "test_lm_parity": "model slow",  # 18 s
        "test_lm_step": "model",
        "test_lm_transformer": "model",
        "test_lm_weights": "model",
        "test_media_call": "sip slow",  # 87 s
        "test_media_port": "sip",  # a pjsua2 endpoint and a loopback call
        "test_media_port_teardown": "sip",  # 10 s: 300 ports destroyed while the bridge ticks them (a child process)
        "test_mimi": "model",
        "test_mimi_conv": "model",
        "test_model_service_sip": "sip model slow",  # 34 s: two `callbot serve` workers on one model service, pjsua2 callers
        "test_model_service": "slow",  # 20 s: `callbot model-service --engine echo` processes, workers on its socket
        "test_mimi_parity": "model slow",  # 27 s
        "test_newcomer::test_endpoint_start_prints_nothing_and_logs_to_the_file": "sip",
        "test_newcomer::test_the_readmes_baresip_line_calls_the_echo_line_from_nothing": "sip slow",  # 6 s
        "test_newcomer::test_a_call_to_a_closed_port_fails_at_once": "sip",  # `callbot call`, 2 s
        "test_newcomer::test_a_call_nobody_answers_in_any_way_fails_after_the_no_response_limit": "sip slow",  # 7 s
        "test_native_layout::test_stubs_match_the_built_modules": "slow",  # 14 s: mypy's stubtest
        "test_process_isolation": "sip model",  # `callbot serve` with the tiny model, a pjsua2 caller
        "test_prompt": "model",
        "test_recording::test_kill_9_mid_call_leaves_a_playable_recording": "slow",  # 4 s of real time
        "test_runner": "model",
        "test_runner_batch": "model",  # 8 s: 4 calls in one batched engine against each call alone
        "test_runner_phase": "model",  # 4 s: calls joining on different ticks put in phase, against each alone
        "test_round_schedule": "",  # pure functions of times
        "test_arrival_watch": "",  # pure functions of times
        "test_cpu_affinity": "",  # threads pinned and asked where they may run
        "test_cpu_affinity::test_the_runner_pins_its_inference_thread_and_mlx_stream_thread": "model",  # 2 s
        "test_cpu_affinity::test_the_inference_process_reports_the_cpus_its_child_pinned": "model",  # 6 s: two children
        "test_serve": "sip model slow",  # 200 s
        "test_session": "model slow",  # 17 s
        "test_session_control": "model slow",  # 36 s
        "test_sip_calls": "sip slow",  # 22 s
        "test_sip_capacity": "sip slow",  # 12 s
        "test_sip_codecs": "sip slow",  # 17 s
        "test_sip_floods": "sip slow",  # 60 s: SIPp floods at 2000/s against an endpoint process
        "test_sip_gate": "sip slow",  # 20 s: 1,000s of refused requests, ACK timeouts
        "test_sip_interop": "sip",  # 9 s
        "test_sip_lifecycle": "sip slow",  # 30 s
        "test_sip_media": "sip slow",  # 15 s
        "test_sip_records": "",  # an Endpoint that is never started
        "test_sip_event_sink": "",  # an Endpoint that is never started
        "test_sip_routes": "sip",  # 7 s: `running_server` with tenants and routes, pjsua2 and raw callers
        "test_sip_registrar": "sip slow",  # 16 s
        "test_sip_robustness": "sip slow",  # 13 s: vanished callers, their slots back after the BYE timeout
        "test_sip_torture": "sip slow",  # 50 s: RFC 4475-style messages over UDP and TCP to `callbot serve`, direct and behind the edge
        "test_sip_secure": "sip slow",  # 12 s
        "test_sip_transfer": "sip slow",  # 10 s
        "test_sip_attended_transfer": "sip slow",  # 14 s
        "test_speech_live": "",  # 7 s: a recognizer child process per test, espeak-ng speech
        "test_speech_recognizer": "",  # 7 s: pocketsphinx on espeak-ng sentences
        "test_speech_settings": "",
        "test_speech_tts": "",  # 1 s: espeak-ng runs
        "test_store": "",  # 15 s: every test on SQLite and on PostgreSQL (one server, tests/pg_server.py)
        "test_store::test_postgresql_going_away_costs_the_writes_meanwhile_and_writing_resumes": "slow",  # 4 s: a server of its own, stopped and started
        "test_store::test_callbot_calls_import_list_show_export": "slow",  # 35 s: `callbot calls` processes
        "test_store::test_the_cli_says_one_line_for_a_store_it_cannot_use": "slow",  # 4 s: three processes
        "test_store::test_callbot_calls_api_serves_until_sigterm": "slow",  # 2 s: a `callbot calls api` process
        "test_retention": "",  # 3 s: calls the Recorder wrote, purged from folders and the store (SQLite, PostgreSQL)
        "test_retention::test_serve_purges_old_calls_at_start_and_every_hour": "sip",  # 1 s: serve's own job
        "test_retention::test_the_command_line_purges_and_erases_with_one_line_each": "slow",  # 6 s: five processes
        "test_store_catch_up": "slow",  # 4 s: SQLite on a tmpfs that fills, a PostgreSQL server of its own stopped and started
        "test_store_calls": "sip slow",
        "test_device_bench": "model",  # 3 s: the GPU bench's fat-binary pruning, its script at the tiny size
        "test_store_export": "",  # CSV cells a spreadsheet would run, written as text
        "test_web_campaigns": "sip slow",  # 15 s: `callbot web` starts a real dialer from chromium (paused), resumes it; a pjsua2 callee
        "test_web_store_down": "",  # 4 s: `callbot web` over a PostgreSQL stopped and started again (httpx)
        "test_web_units": "",  # 2 s: the limiter, CSRF, scopes, users on SQLite and PostgreSQL
        "test_web_editor": "",  # 8 s: TOML path -> line, the flow graph, saving, config edits, reloads, the editor's pages (uvicorn + httpx)
        "test_web_editor_serve": "sip slow",  # 50 s: a flow edited in chromium (panel in serve, and beside it), pjsua2 calls before and after the save; a persona and a route's number reaching the next call
        "test_web_serve": "sip slow",  # 15 s: `callbot serve` with [web] listen, a pjsua2 call seen in chromium
        "test_web_live_units": "",  # 5 s: app/web_link.py on a real bus and echo CallRouter, the SSE stream over HTTP
        "test_web_live": "sip slow",
        "test_web_live::test_the_models_words_and_step_times_in_the_browser": "model",  # the tiny model in serve  # 30 s: serve's /live and /system; a pjsua2 call heard, shown by SSE in chromium, hung up from the page
        "test_web": "slow",  # 15 s: `callbot web` over two imported, analysed calls; headless chromium via selenium  # `callbot serve` into the store: a flow call, a SIGKILL mid-call
    }.items()
}
# fixtures that start a real SIP stack: a test that uses one is `sip` wherever it lives
SIP_FIXTURES = frozenset({"echo_line"})


def markers_of(module: str, test: str, fixtures) -> frozenset[str]:
    """The markers MARKS gives one test: its file's, its own, and `sip` for a SIP fixture."""
    own = MARKS.get(module, frozenset({"sip"}) if module.startswith("test_sip_") else frozenset())
    own |= MARKS.get(f"{module}::{test}", frozenset())
    if SIP_FIXTURES.intersection(fixtures):
        own |= {"sip"}
    return own


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in sorted(markers_of(item.path.stem, getattr(item, "originalname", item.name),
                                      getattr(item, "fixturenames", ()))):
            item.add_marker(name)


@pytest.fixture
def echo_line(tmp_path):
    """A started Endpoint on 127.0.0.1 (any free port) answering with the echo engine and recording every
    call into `tmp_path`; stopped, with its engine and recorder, after the test."""
    engine = EchoEngine()
    recorder = Recorder(tmp_path)
    ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),)),
                  sessions=CallRouter(engine), recorder=recorder)
    try:
        yield ep.start()
    finally:
        ep.stop()
        engine.close()
        recorder.close()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/pg_server.py), stopped at its end; skipped, with
    the reason, where no PostgreSQL is installed (.ci/run installs Debian's `postgresql`)."""
    from tests.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) on this machine")
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()
