"""Settings of every roost process: ``ROOST_*`` environment variables and an optional config file.

Sources, strongest first: keyword arguments to ``load_settings`` (what the command line sets), the
environment (``ROOST_BUS_URL``, nested fields with ``__``: ``ROOST_SERVICES__INVENTORY__BROKER_PASSWORD``,
``ROOST_BROKER_TLS__CA_FILE``), the config file (TOML or YAML, chosen by its suffix; its path comes
from ``--config`` or ``ROOST_CONFIG``), then the defaults.

Secrets are ``SecretStr`` (or a masked URL type): ``repr()``, ``str()``, ``model_dump()`` and
``model_dump_json()`` never show them; code that connects asks for the clear value explicitly
(``get_secret_value()``, ``broker_connect_url(service)``).  ``mask_url`` renders any URL for a log line.

Validation errors are reported without the offending input (it may be a password):
``load_settings`` raises ``ConfigError`` with one readable line per problem.
"""

from __future__ import annotations

import os
import ssl
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, Secret, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

BUS_SCHEMES = frozenset({"nats", "tls", "amqp", "amqps"})
TLS_BUS_SCHEMES = frozenset({"tls", "amqps"})
DATABASE_SCHEMES = frozenset({"postgresql", "postgres"})
MASK = "***"

# Query parameters that carry credentials in DSNs (libpq's ``password``, ``sslpassword``, tokens).
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "pass", "passwd", "token", "secret", "auth_token"})

CONFIG_ENV = "ROOST_CONFIG"


class ConfigError(Exception):
    """The settings are invalid or the config file is unusable.  The message never holds a secret."""


def mask_url(url: str | None) -> str:
    """``url`` with its password (and credential query parameters) replaced by ``***``, for logs.

    ``amqp://roost:s3cret@host:5672/vh`` -> ``amqp://roost:***@host:5672/vh``; a user part without a
    password (a NATS token) is masked whole: ``nats://***@host:4222``.  A URL that cannot be
    parsed is masked whole after its scheme rather than risk showing a secret.
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            # a user without a password may itself be the credential (NATS token auth: nats://token@host)
            netloc = f"{user}:{MASK}@{hostport}" if sep else f"{MASK}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
                query = urlencode([(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                                  safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://{MASK}" if scheme.isalpha() else MASK


def url_with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with its user and password replaced (both percent-encoded); ``None`` keeps what it has."""
    if username is None and password is None:
        return url
    parts = urlsplit(url)
    old_user = unquote(parts.username) if parts.username else None
    old_password = unquote(parts.password) if parts.password else None
    user = username if username is not None else old_user
    pw = password if password is not None else old_password
    hostport = parts.netloc.rpartition("@")[2]
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
        if pw is not None:
            userinfo += ":" + quote(pw, safe="")
        userinfo += "@"
    return urlunsplit((parts.scheme, userinfo + hostport, parts.path, parts.query, parts.fragment))


class MaskedUrl(Secret[str]):
    """A URL that may carry credentials; shown (repr, str, dumps) with the password masked."""

    def _display(self) -> str:
        return mask_url(self.get_secret_value())

    @property
    def scheme(self) -> str:
        return urlsplit(self.get_secret_value()).scheme.lower()

    @property
    def masked(self) -> str:
        return self._display()


class TLSFiles(BaseModel):
    """PEM files for TLS: the CA that signs the server's certificate, and an optional client certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def configured(self) -> bool:
        return any(p is not None for p in (self.ca_file, self.cert_file, self.key_file))


class ServiceCredentials(BaseModel):
    """What one service (or agent) presents to the broker and to PostgreSQL.

    A credential per service lets the broker restrict who publishes what (RabbitMQ topic permissions,
    NATS users with subject permissions) and PostgreSQL restrict each service to its own schema.
    Unset fields fall back to what the URL carries and to the shared TLS files.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    database_username: str | None = None
    database_password: SecretStr | None = None
    database_cert_file: Path | None = None
    database_key_file: Path | None = None


HeartbeatNetwork = Literal["mgmt", "cluster-host", "oam"]


class HeartbeatSettings(BaseModel):
    """The heartbeat monitor on this controller (``services.heartbeat.service``).

    ``addresses``: this controller's own address on each heartbeat network, where the monitor binds (as
    inventory records the controller); none: the service runs but monitors nothing, and says so.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    controller: str = Field(default="controller-0", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                            description="the controller this monitor runs on")
    addresses: dict[HeartbeatNetwork, str] = Field(default_factory=dict)
    port: int = Field(default=2224, ge=0, le=65535, description="the monitor's UDP port on every network")
    agent_port: int = Field(default=2223, ge=1, le=65535, description="the agents' UDP port")
    period: float = Field(default=0.1, ge=0.01, le=10.0, description="seconds between heartbeat requests")
    require_auth: dict[HeartbeatNetwork, bool] = Field(
        default_factory=dict, description="per network; missing: authentication required")
    peer: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                             description="the other controller: runs the controller pair with it")
    peer_addresses: dict[HeartbeatNetwork, str] = Field(
        default_factory=dict, description="where the other controller's monitor listens (at the same port)")
    fence_timeout: float = Field(default=20.0, gt=0, le=300, description="seconds for a fence to read back Off")
    witness_node_id: int | None = Field(default=None, ge=1, le=0xEFFF_FFFF,
                                        description="a witness voter of the controller pair (`roost heartbeat "
                                                    "witness`): its node id, unused by any host")
    witness_addresses: dict[HeartbeatNetwork, str] = Field(
        default_factory=dict, description="where the witness answers (at the agents' port)")


def default_data_dir() -> Path:
    return platformdirs.user_data_path("roost")


LogFormat = Literal["json", "console", "auto"]
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RoostSettings(BaseSettings):
    """Everything a roost process is configured with.  Build it with ``load_settings``."""

    model_config = SettingsConfigDict(
        env_prefix="ROOST_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
        hide_input_in_errors=True,
    )

    bus_url: MaskedUrl | None = Field(
        default=None, description="nats://, tls:// (NATS over TLS), amqp:// or amqps://; unset: an embedded NATS")
    database_url: MaskedUrl | None = Field(
        default=None, description="postgresql://…; unset: an embedded PostgreSQL under data_dir")
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="where embedded servers and the secret store keep their data")
    log_format: LogFormat = Field(default="auto", description="json, console, or auto (console on a terminal)")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    http_host: str = Field(default="127.0.0.1", description="address the HTTP APIs listen on")
    http_base_port: int = Field(default=8470, ge=0, le=65535,
                                description="the first service listens here, the next on +1, …; 0: free ports")
    broker_tls: TLSFiles = Field(default_factory=TLSFiles)
    database_tls: TLSFiles = Field(default_factory=TLSFiles)
    services: dict[str, ServiceCredentials] = Field(
        default_factory=dict, description="credentials per service (and per agent), by name")
    dlq_alarm_threshold: int = Field(default=100, ge=1,
                                     description="dead letters waiting before it is announced")
    outbox_retention_days: float = Field(default=7.0, gt=0, description="sent outbox rows are kept this long")
    alarm_history_retention_days: float | None = Field(
        default=None, gt=0, description="the alarm event log is kept this long (unset: the alarms service's 30)")
    inbox_retention_days: float = Field(default=14.0, gt=0,
                                        description="inbox entries (the duplicate filter) are kept this long")
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    failed_host_recovery: Literal["none", "reset"] = Field(
        default="none", description="reset: inventory resets a worker or storage host that fails its heartbeat "
                                    "through its BMC")

    @field_validator("bus_url", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("bus_url")
    @classmethod
    def _bus_scheme(cls, value: MaskedUrl | None) -> MaskedUrl | None:
        if value is not None and value.scheme not in BUS_SCHEMES:
            raise ValueError(f"bus_url must start with one of {', '.join(sorted(s + '://' for s in BUS_SCHEMES))}")
        if value is not None and not urlsplit(value.get_secret_value()).hostname:
            raise ValueError("bus_url has no host")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: MaskedUrl | None) -> MaskedUrl | None:
        if value is not None and value.scheme not in DATABASE_SCHEMES:
            raise ValueError("database_url must start with postgresql://")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        level = str(value).strip().upper()
        if level == "WARN":
            level = "WARNING"
        if level not in _LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LEVELS)}")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_path.get()
        if path is not None:
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    # -- what the adapters and the database layer ask for ---------------------------------------

    def credentials(self, service: str) -> ServiceCredentials:
        """The credentials configured for ``service`` (empty when none: the URL's own are used)."""
        return self.services.get(service, ServiceCredentials())

    def broker_connect_url(self, service: str) -> str | None:
        """The broker URL in clear with ``service``'s username/password in it.  Never log it."""
        if self.bus_url is None:
            return None
        creds = self.credentials(service)
        password = creds.broker_password.get_secret_value() if creds.broker_password else None
        return url_with_credentials(self.bus_url.get_secret_value(), creds.broker_username, password)

    def database_connect_url(self, service: str) -> str | None:
        """The PostgreSQL URL in clear with ``service``'s role and password in it.  Never log it."""
        if self.database_url is None:
            return None
        creds = self.credentials(service)
        password = creds.database_password.get_secret_value() if creds.database_password else None
        return url_with_credentials(self.database_url.get_secret_value(), creds.database_username, password)

    def broker_ssl_context(self, service: str) -> ssl.SSLContext | None:
        """TLS for the broker: when the URL asks for it (tls://, amqps://) or TLS files are configured."""
        creds = self.credentials(service)
        scheme = self.bus_url.scheme if self.bus_url is not None else ""
        return _ssl_context(self.broker_tls, creds.broker_cert_file, creds.broker_key_file,
                            required=scheme in TLS_BUS_SCHEMES)

    def database_ssl_context(self, service: str) -> ssl.SSLContext | None:
        """TLS for PostgreSQL: when TLS files are configured (else the URL's ``sslmode`` decides)."""
        creds = self.credentials(service)
        return _ssl_context(self.database_tls, creds.database_cert_file, creds.database_key_file, required=False)

    def describe(self) -> dict[str, Any]:
        """A summary safe to log or print: URLs masked, secrets hidden."""
        return self.model_dump(mode="json")


def _ssl_context(tls: TLSFiles, cert: Path | None, key: Path | None, *, required: bool) -> ssl.SSLContext | None:
    cert = cert or tls.cert_file
    key = key or tls.key_file
    if not required and tls.ca_file is None and cert is None:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


# The config file being loaded: read by ``settings_customise_sources`` (a classmethod, so it cannot be
# passed in).  Set only for the duration of one ``load_settings`` call.
_config_path: ContextVar[Path | None] = ContextVar("roost_config_path", default=None)


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> RoostSettings:
    """Build the settings: ``overrides`` (the command line; ``None`` values are ignored), then
    ``ROOST_*``, then the config file.  ``config`` (``--config``) wins over ``ROOST_CONFIG``.

    Raises ``ConfigError`` with a readable message that never includes a value.
    """
    raw_path = config if config is not None else os.environ.get(CONFIG_ENV) or None
    path: Path | None = None
    if raw_path is not None:
        path = Path(raw_path).expanduser()
        if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    token = _config_path.set(path)
    try:
        return RoostSettings(**kwargs)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "cannot parse it"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML: {problem}{at}") from None
    except (ValueError, OSError) as exc:  # an unreadable or malformed config file, a bad nested variable
        where = f"config file {path}" if path else "settings"
        raise ConfigError(f"{where}: {type(exc).__name__}: {_first_line(str(exc))}") from None
    finally:
        _config_path.reset(token)


def format_validation_error(exc: ValidationError, path: Path | None = None) -> str:
    """One line per problem, naming the setting and its environment variable, never the value."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"])
        env = "ROOST_" + "__".join(str(p) for p in err["loc"]).upper()
        lines.append(f"{loc} ({env}): {err['msg']}")
    head = "invalid settings" + (f" (config file {path})" if path else "")
    return head + ": " + "; ".join(lines)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
