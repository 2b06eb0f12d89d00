"""Settings: sources and their order, validation without leaking values, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.settings import ConfigError, RoostSettings, load_settings, mask_url, url_with_credentials

PASSWORD = "pl4nted-Broker-Pw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ROOST_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert s.bus_url is None and s.database_url is None
    assert s.data_dir.name == "roost"
    assert s.log_format == "auto" and s.log_level == "INFO"
    assert s.http_base_port == 8470 and s.dlq_alarm_threshold == 100
    assert s.broker_connect_url("inventory") is None
    assert s.broker_ssl_context("inventory") is None


def test_environment_and_nested_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_BUS_URL", "amqp://guest:guest@localhost:5672/")
    monkeypatch.setenv("ROOST_LOG_LEVEL", "warn")
    monkeypatch.setenv("ROOST_SERVICES__INVENTORY__BROKER_USERNAME", "inventory")
    monkeypatch.setenv("ROOST_SERVICES__INVENTORY__BROKER_PASSWORD", PASSWORD)
    s = load_settings()
    assert s.log_level == "WARNING"
    assert s.bus_url is not None and s.bus_url.scheme == "amqp"
    url = s.broker_connect_url("inventory")
    assert url == f"amqp://inventory:{PASSWORD}@localhost:5672/"
    # a service without its own credentials uses the URL's
    assert s.broker_connect_url("alarms") == "amqp://guest:guest@localhost:5672/"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    path = tmp_path / f"roost{suffix}"
    if suffix == ".toml":
        path.write_text('bus_url = "nats://n1:4222"\nhttp_base_port = 9000\nlog_format = "json"\n'
                        '[services.alarms]\nbroker_password = "from-file"\n')
    else:
        path.write_text('bus_url: "nats://n1:4222"\nhttp_base_port: 9000\nlog_format: json\n'
                        'services:\n  alarms:\n    broker_password: from-file\n')
    monkeypatch.setenv("ROOST_CONFIG", str(path))
    monkeypatch.setenv("ROOST_HTTP_BASE_PORT", "9100")           # env beats the file
    s = load_settings(log_format="console", data_dir=None)    # arguments beat both; None is ignored
    assert s.bus_url is not None and s.bus_url.get_secret_value() == "nats://n1:4222"
    assert s.http_base_port == 9100
    assert s.log_format == "console"
    alarms = s.credentials("alarms").broker_password
    assert alarms is not None and alarms.get_secret_value() == "from-file"
    # --config wins over ROOST_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("http_base_port = 1234\n")
    monkeypatch.delenv("ROOST_HTTP_BASE_PORT")
    assert load_settings(other).http_base_port == 1234


def test_secrets_are_never_shown() -> None:
    s = RoostSettings(bus_url=f"amqps://roost:{PASSWORD}@broker:5671/",
                      database_url=f"postgresql://roost:{PASSWORD}@db/roost?sslpassword={PASSWORD}",
                      services={"inventory": {"broker_password": PASSWORD, "database_password": PASSWORD}})
    for text in (repr(s), str(s), str(s.model_dump()), s.model_dump_json(), str(s.describe())):
        assert PASSWORD not in text
    assert "amqps://roost:***@broker:5671/" in s.model_dump_json()
    assert s.database_connect_url("inventory") == f"postgresql://roost:{PASSWORD}@db/roost?sslpassword={PASSWORD}"


def test_invalid_values_give_clear_errors_without_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(bus_url=f"http://roost:{PASSWORD}@x/")
    assert "bus_url (ROOST_BUS_URL)" in str(err.value) and "nats://" in str(err.value)
    assert PASSWORD not in str(err.value)
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(log_level="loud")
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(database_url=f"mysql://u:{PASSWORD}@h/db")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("bus_url = \n")
    with pytest.raises(ConfigError, match="config file"):
        load_settings(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"bus_url: [amqp://u:{PASSWORD}@h\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_settings(bad_yaml)
    assert PASSWORD not in str(err.value)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("bus_uri = 'nats://x'\n")
    with pytest.raises(ConfigError, match="bus_uri"):
        load_settings(unknown)


def test_empty_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_BUS_URL", "")
    assert load_settings().bus_url is None


@pytest.mark.parametrize(("url", "masked"), [
    ("amqp://u:p@h:5672/v", "amqp://u:***@h:5672/v"),
    ("nats://tok@h:4222", "nats://***@h:4222"),
    ("nats://h:4222", "nats://h:4222"),
    ("postgresql://u:p%40ss@h/db?sslmode=require&password=x", "postgresql://u:***@h/db?sslmode=require&password=***"),
    ("", ""),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_url_with_credentials_encodes() -> None:
    assert url_with_credentials("amqp://h/", "a b", "p@ss:/") == "amqp://a%20b:p%40ss%3A%2F@h/"
    assert url_with_credentials("amqp://x:y@h/", None, "z") == "amqp://x:z@h/"
    assert url_with_credentials("amqp://x:y@h/", None, None) == "amqp://x:y@h/"


def test_a_malformed_nested_variable_is_named_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_SERVICES", f'{{"inventory": {{"broker_password": "{PASSWORD}"')
    with pytest.raises(ConfigError, match="services") as err:
        load_settings()
    assert PASSWORD not in str(err.value)
