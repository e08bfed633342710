"""Config: defaults, TOML, environment overrides, and refusals that name the key."""

from __future__ import annotations

import pytest

from processor.config import Config, env_overrides, load
from processor.errors import ConfigError


def test_defaults_need_no_file():
    cfg = load(None, environ={})
    assert cfg == Config()
    assert cfg.transport.kind == "zmq"
    assert cfg.transport.zmq.sub == "tcp://127.0.0.1:5555" and cfg.transport.zmq.sub_bind
    assert cfg.window.models == 20 and cfg.window.key == [] and cfg.window.timeout_ms == 5000
    assert cfg.metrics.host == "127.0.0.1" and cfg.metrics.port == 9464
    assert cfg.aggregate.strategy == "sum_probs"


def test_toml_file_then_env_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('''
[transport]
kind = "swergio"
[transport.swergio]
port = 9000
[window]
models = 4
key = ["ENV_ID", "STEP"]
model_ids = []
[aggregate]
deterministic = true
''')
    env = {"SWARM_AGG__TRANSPORT__SWERGIO__PORT": "9100",
           "SWARM_AGG__WINDOW__TIMEOUT_MS": "250",
           "SWARM_AGG__TRANSPORT__SWERGIO__HOST": "10.1.2.3",     # a plain string
           "SWARM_AGG__WINDOW__KEY": '["STEP"]',
           "OTHER": "ignored"}
    cfg = load(f, environ=env)
    assert cfg.transport.kind == "swergio"
    assert cfg.transport.swergio.port == 9100
    assert cfg.transport.swergio.host == "10.1.2.3"
    assert cfg.window.models == 4 and cfg.window.timeout_ms == 250
    assert cfg.window.key == ["STEP"]
    assert cfg.aggregate.deterministic is True


def test_env_tree():
    # texts: the declared type of each key decides how to read them
    assert env_overrides({"SWARM_AGG__A__B__C": "1", "SWARM_AGG__A__D": "x"}) == \
        {"a": {"b": {"c": "1"}, "d": "x"}}


def test_env_values_are_read_by_the_type_of_their_key():
    cfg = load(None, environ={"SWARM_AGG__WINDOW__MODELS": "7",
                              "SWARM_AGG__WINDOW__KEY": "ENV_ID,STEP",
                              "SWARM_AGG__AGGREGATE__DETERMINISTIC": "true",
                              "SWARM_AGG__TOPICS__ACTION": "1234",
                              "SWARM_AGG__TRANSPORT__SWERGIO__NAME": "true"})
    assert cfg.window.models == 7 and cfg.window.key == ["ENV_ID", "STEP"]
    assert cfg.aggregate.deterministic is True
    assert cfg.topics.action == "1234" and cfg.transport.swergio.name == "true"
    cfg = load(None, environ={"SWARM_AGG__WINDOW__KEY": '["ENV_ID", "STEP"]'})
    assert cfg.window.key == ["ENV_ID", "STEP"]


@pytest.mark.parametrize("field", ["password", "token"])
@pytest.mark.parametrize("secret", ["123456", "007", "true", "[1, 2]", 'a"b', "1.5e3"])
def test_a_secret_from_the_environment_is_its_text(field, secret):
    name = f"SWARM_AGG__TRANSPORT__NATS__{field.upper()}"
    cfg = load(None, environ={name: secret})
    assert getattr(cfg.transport.nats, field) == secret
    assert secret not in repr(cfg) and secret not in cfg.describe()


@pytest.mark.parametrize("field", ["password", "token"])
def test_a_numeric_secret_in_the_file_is_its_text(tmp_path, field):
    f = tmp_path / "c.toml"
    f.write_text(f"[transport.nats]\n{field} = 123456\n")
    assert getattr(load(f, environ={}).transport.nats, field) == "123456"


@pytest.mark.parametrize("value", ["98765.4321", "[98765, 4321]", "{ x = 98765 }", "true"])
def test_a_secret_of_the_wrong_type_is_refused_without_being_shown(tmp_path, value):
    f = tmp_path / "c.toml"
    f.write_text(f"[transport.nats]\npassword = {value}\n")
    with pytest.raises(ConfigError) as e:
        load(f, environ={})
    assert e.value.key == "transport.nats.password"
    assert "98765" not in str(e.value) and "true" not in str(e.value).replace("a secret", "")


def test_credentials_in_a_nats_url_are_refused_without_being_shown():
    from processor.config import from_mapping

    for url in ("nats://alice:s3cr3t@127.0.0.1:4222", "alice:s3cr3t@127.0.0.1"):
        with pytest.raises(ConfigError) as e:
            from_mapping({"transport": {"nats": {"servers": [url]}}})
        assert e.value.key == "transport.nats.servers" and "s3cr3t" not in str(e.value)


@pytest.mark.parametrize("data,key", [
    ({"transport": {"zmq": {"sub": "tcp://127.0.0.1:99999"}}}, "transport.zmq.sub"),
    ({"transport": {"zmq": {"pub": "tcp://127.0.0.1:0x10"}}}, "transport.zmq.pub"),
    ({"transport": {"zmq": {"pub": "tcp://:5556"}}}, "transport.zmq.pub"),
    ({"transport": {"zmq": {"sub": "udp://127.0.0.1:5555"}}}, "transport.zmq.sub"),
    ({"transport": {"zmq": {"sub": "tcp://127.0.0.1"}}}, "transport.zmq.sub"),
    ({"transport": {"nats": {"servers": ["nats://127.0.0.1:70000"]}}},
     "transport.nats.servers"),
    ({"transport": {"nats": {"servers": ["http://127.0.0.1:4222"]}}},
     "transport.nats.servers"),
])
def test_endpoints_are_validated(data, key):
    from processor.config import from_mapping

    with pytest.raises(ConfigError) as e:
        from_mapping(data)
    assert e.value.key == key


def test_good_endpoints_pass():
    from processor.config import from_mapping

    from_mapping({"transport": {"zmq": {"sub": "tcp://127.0.0.1:*", "pub": "ipc:///tmp/x"},
                                "nats": {"servers": ["nats://a:4222", "tls://b", "nats://c"]}}})


@pytest.mark.parametrize("data,key", [
    ({"window": {"modles": 3}}, "window.modles"),
    ({"nope": {}}, "nope"),
    ({"transport": {"kind": "kafka"}}, "transport.kind"),
    ({"transport": {"zmq": {"sub_bind": "yes"}}}, "transport.zmq.sub_bind"),
    ({"transport": {"zmq": {"pub": "localhost:5"}}}, "transport.zmq.pub"),
    ({"window": {"models": -1}}, "window.models"),
    ({"window": {"models": "20"}}, "window.models"),
    ({"window": {"timeout_ms": 1.5}}, "window.timeout_ms"),
    ({"window": {"min_models": 0}}, "window.min_models"),
    ({"window": {"models": 0, "timeout_ms": 0}}, "window.timeout_ms"),
    ({"window": {"model_ids": ["a", "a"]}}, "window.model_ids"),
    ({"window": {"key": "STEP"}}, "window.key"),
    ({"aggregate": {"strategy": "vote"}}, "aggregate.strategy"),
    ({"aggregate": {"seed": True}}, "aggregate.seed"),
    ({"metrics": {"port": 70000}}, "metrics.port"),
    ({"log": {"level": "LOUD"}}, "log.level"),
    ({"topics": {"action": "logits"}}, "topics"),
    ({"window": 3}, "window"),
])
def test_bad_config_names_the_key(data, key):
    from processor.config import from_mapping

    with pytest.raises(ConfigError) as e:
        from_mapping(data)
    assert e.value.key == key
    assert f"'{key}'" in str(e.value)


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError) as e:
        load(None, environ={"SWARM_AGG__WINDOW__MODELS": "many"})
    assert e.value.key == "window.models"


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "absent.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[window\nmodels = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, environ={})


def test_roster_ids_may_be_numbers():
    from processor.config import from_mapping

    cfg = from_mapping({"window": {"model_ids": [0, 1, "two"]}})
    assert cfg.window.model_ids == ["0", "1", "two"]
    assert cfg.expected_models() == 3
