"""The serve configuration: embedded default, and one clear line per mistake, naming where it is."""

import pytest

from callbot.app.settings import ConfigError, Settings, load_settings, parse_settings


def test_embedded_default_is_direct_mode_bot_at_5060():
    s = Settings()
    acc = s.sip.accounts[0]
    assert acc.direct and acc.user == "bot"
    assert s.sip.transports[0].bind == "0.0.0.0" and s.sip.transports[0].port == 5060
    assert s.bots[0].voice == "NATF2" and s.bots[0].persona
    assert s.recordings_dir == "./calls"
    assert s.bot_for_account(acc.name) is s.bots[0]


def test_full_config_decodes(tmp_path):
    text = """
recordings_dir = "rec"
[model]
path = "weights"
quantization = "q8"
[sip]
codecs = ["PCMU/8000"]
[[sip.transports]]
name = "udp"
port = 5070
[[sip.accounts]]
name = "pbx"
user = "1001"
registrar = "sip:pbx.example.com"
password = "secret"
[[bots]]
name = "support"
voice = "VARM4"
persona = "You answer questions about invoices."
account = "pbx"
[bots.sampling]
text_temperature = 0.0
seed = 7
[metrics]
address = "127.0.0.1:9999"
"""
    s = parse_settings(text, base_dir=tmp_path)
    assert s.model.quantization == "q8"
    assert s.model.path == str(tmp_path / "weights")
    assert s.recordings_dir == str(tmp_path / "rec")
    assert s.sip.accounts[0].registrar == "sip:pbx.example.com"
    assert s.bots[0].sampling.seed == 7 and s.bots[0].sampling.text_temperature == 0.0
    assert s.bot_for_account("pbx").name == "support"
    assert s.bot("support").voice == "VARM4"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[model]\nquantisation = 'q4'\n", "$.model: Object contains unknown field `quantisation`"),
        ("[model]\nquantization = 'q3'\n",
         "$.model.quantization: Invalid enum value 'q3', expected one of 'none', 'q4', 'q8'"),
        ("[[sip.transports]]\nname = 'a'\n[[sip.transports]]\nname = 'b'\nkind = 'sctp'\n",
         "$.sip.transports[1].kind: Invalid enum value 'sctp', expected one of 'tcp', 'tls', 'udp'"),
        ("[sip]\nconference_clock_rate = 44100\n",
         "$.sip.conference_clock_rate: Invalid enum value 44100, expected one of 8000, 16000, 24000"),
        ("[[bots]]\nname = 'a'\nmax_call_s = 'long'\n", "$.bots[0].max_call_s: Expected `float | null`, got `str`"),
        ("[[bots]]\nname = 'a'\nvoice = 'NATF9'\n", '$.bots[0].voice: unknown voice "NATF9", expected one of NATF0'),
        ("[[bots]]\nname = 'a'\naccount = 'nope'\n", "$.bots[0].account: unknown account 'nope'"),
        ("[[bots]]\nname = 'a'\n[[bots]]\nname = 'a'\n", "$.bots[1].name: bot name 'a' is used twice"),
        ("[[bots]]\nvoice = 'me.wav'\n", "$.bots[0].voice: voice file"),
        ("[sip]\nmax_calls = 9\n", "$.sip.max_calls: Expected `int` <= 4"),
        ("[[sip.accounts]]\nname = 'x'\nuser = 'a'\npassword = 'p'\n", "a password needs a registrar"),
        ("recordings_dir = [\n", "not valid TOML"),
        # tenants, routes, a bot's tenant, flow and language (app/routes.py)
        ("[[bots]]\ntenant = 'acme'\n", "$.bots[0].tenant: unknown tenant 'acme', none are configured ([[tenants]])"),
        ("[[tenants]]\nname = 'a'\n[[bots]]\ntenant = 'b'\n", "$.bots[0].tenant: unknown tenant 'b', expected one of a"),
        ("[[bots]]\nflow = 'menu.toml'\n", "$.bots[0].flow: flow file '"),
        ("[[bots]]\nlanguage = 'english'\n", '$.bots[0].language: \'english\' is not a language tag like "en"'),
        ("[[tenants]]\nname = '../up'\n", "$.tenants[0].name: '../up' must be 1-64 letters, digits"),
        ("[[tenants]]\nname = 'a'\n[[tenants]]\nname = 'a'\n", "$.tenants[1].name: tenant name 'a' is used twice"),
        ("[[tenants]]\nname = 'a'\n[[tenants]]\nname = 'b'\nrecordings_dir = 'calls/a'\n",
         "$.tenants[1].recordings_dir: "),
        ("[[tenants]]\nrecordings_dir = 'x'\n", "$.tenants[0]: Object missing required field `name`"),
        ("[[routes]]\ndid = '1'\n", "$.routes[0]: Object missing required field `bot`"),
        ("[[routes]]\nbot = 'nobody'\n", "$.routes[0].bot: unknown bot 'nobody', expected one of default"),
        ("[[routes]]\nbot = 'default'\naccount = 'x'\n", "$.routes[0].account: unknown account 'x', expected one of default"),
        ("[[routes]]\nbot = 'default'\ndid = ['1', ' + ']\n", "$.routes[0].did: a number must not be empty"),
        ("[[routes]]\nbot = 'default'\ndid = 15550001\n", "$.routes[0].did: Expected `str | array | null`, got `int`"),
        ("[[routes]]\nbot = 'default'\ncaller = '(+49'\n", "$.routes[0].caller: '(+49' is not a regular expression"),
        ("[[routes]]\nbot = 'default'\nheader = { name = 'X-T', match = '[' }\n",
         "$.routes[0].header.match: '[' is not a regular expression"),
        ("[[routes]]\nbot = 'default'\nheader = { name = 'Subject', match = 'x' }\n",
         "$.routes[0].header.name: 'Subject' is not a header a call keeps"),
        ("[[routes]]\nbot = 'default'\nheader = { name = 'X-T' }\n", "$.routes[0].header: Object missing required field `match`"),
        ("[[routes]]\nbot = 'default'\nvariables = { n = 1 }\n", "$.routes[0].variables[...]: Expected `str`, got `int`"),
        ("[[routes]]\nbot = 'default'\ndids = '1'\n", "$.routes[0]: Object contains unknown field `dids`"),
        ("[routing]\nno_route = 200\n", "$.routing.no_route: Invalid enum value 200, expected one of 403, 404, 480, 486, 503, 603"),
    ],
)
def test_bad_config_is_one_line_naming_the_place(text, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_settings(text, base_dir=tmp_path)
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_voice_file_relative_to_config(tmp_path):
    (tmp_path / "me.wav").write_bytes(b"RIFF")
    s = parse_settings("[[bots]]\nvoice = 'me.wav'\n", base_dir=tmp_path)
    assert s.bots[0].voice == str(tmp_path / "me.wav")


def test_flow_file_relative_to_config_and_routes_decode(tmp_path):
    (tmp_path / "menu.toml").write_text('start = "bye"\n[states.bye]\nhangup = true\n')
    s = parse_settings("""
[[tenants]]
name = "acme"
recordings_dir = "acme-calls"
[[bots]]
name = "a"
tenant = "acme"
flow = "menu.toml"
language = "zh-Hant-TW"
[[routes]]
did = ["+1 555-0001", "15550002"]
caller = "^\\\\+49"
header = { name = "X-Tenant", match = "acme" }
bot = "a"
variables = { product = "widgets" }
[routing]
no_route = 480
reason = "Nobody here"
""", base_dir=tmp_path)
    assert s.bots[0].flow == str(tmp_path / "menu.toml") and s.bots[0].language == "zh-Hant-TW"
    assert s.tenants[0].recordings_dir == str(tmp_path / "acme-calls") == s.tenant_dir("acme")
    route = s.routes[0]
    assert route.did == ("+1 555-0001", "15550002") and route.caller == "^\\+49" and route.header.name == "X-Tenant"
    assert route.variables == {"product": "widgets"} and (s.routing.no_route, s.routing.reason) == (480, "Nobody here")
    assert Settings().routes == () and Settings().routing.no_route == 404 and Settings().bots[0].language == "en"


def test_load_settings_names_the_file(tmp_path):
    cfg = tmp_path / "callbot.toml"
    cfg.write_text("[model]\nwat = 1\n")
    with pytest.raises(ConfigError, match=r"callbot\.toml: \$\.model: Object contains unknown field `wat`"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "missing.toml")
    assert load_settings(None) == Settings()


def test_password_from_environment(tmp_path, monkeypatch):
    text = """
[[sip.accounts]]
name = "pbx"
user = "1001"
registrar = "sip:pbx.example.com"
password_env = "CALLBOT_TEST_PBX_PASSWORD"
"""
    monkeypatch.delenv("CALLBOT_TEST_PBX_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"\$\.sip\.accounts\[0\]\.password_env: environment variable "
                                          "CALLBOT_TEST_PBX_PASSWORD is not set"):
        parse_settings(text, base_dir=tmp_path)
    monkeypatch.setenv("CALLBOT_TEST_PBX_PASSWORD", "s3cret")
    acc = parse_settings(text, base_dir=tmp_path).sip.accounts[0]
    assert acc.password == "s3cret" and acc.password_env is None
    with pytest.raises(ConfigError, match="not both"):
        parse_settings(text.replace('password_env', 'password = "x"\npassword_env'), base_dir=tmp_path)


def test_bot_max_call_length_applies_to_its_account(tmp_path):
    text = """
[[sip.accounts]]
name = "a"
user = "a"
[[sip.accounts]]
name = "b"
user = "b"
max_call_duration_s = 60
[[bots]]
name = "x"
account = "a"
max_call_s = 120
[[bots]]
name = "y"
account = "b"
max_call_s = 300
"""
    cfg = parse_settings(text, base_dir=tmp_path).endpoint_config()
    assert [a.max_call_duration_s for a in cfg.accounts] == [120, 60]


def test_bridge_rate_is_one_the_engine_serves(tmp_path):
    import typing

    from callbot.engine.contract import CALL_RATES
    from callbot.sip.config import EndpointConfig

    hints = typing.get_type_hints(EndpointConfig)
    assert typing.get_args(hints["conference_clock_rate"]) == CALL_RATES
    with pytest.raises(ConfigError, match=r"\$\.sip\.conference_clock_rate: Invalid enum value 48000"):
        parse_settings("[sip]\nconference_clock_rate = 48000\n", base_dir=tmp_path)


def test_campaigns_dialer_config_is_relative_to_the_config_and_must_exist(tmp_path):
    (tmp_path / "dialer.toml").write_text("")
    s = parse_settings('[campaigns]\ndialer_config = "dialer.toml"\nengine = "echo"\n', base_dir=tmp_path)
    assert s.campaigns.dialer_config == str(tmp_path / "dialer.toml") and s.campaigns.engine == "echo"
    assert parse_settings("", base_dir=tmp_path).campaigns.engine == "model"
    with pytest.raises(ConfigError, match=r"\$.campaigns.dialer_config: .*missing.toml.*no such file"):
        parse_settings('[campaigns]\ndialer_config = "missing.toml"\n', base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"campaigns.engine"):
        parse_settings('[campaigns]\nengine = "gpt"\n', base_dir=tmp_path)
