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
    assert env_overrides({"SWARM_AGG__A__B__C": "1", "SWARM_AGG__A__D": "x"}) == \
        {"a": {"b": {"c": 1}, "d": "x"}}


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
