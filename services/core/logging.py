"""Structured logs for every roost process: JSON in production, readable on a terminal.

``configure_logging`` sends structlog's events and the stdlib ``logging`` records of third-party
libraries (aio-pika, aiormq, nats, asyncpg, uvicorn) through one handler and one chain of processors,
so every line has the same keys: ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event``,
the context variables bound for the work in hand, and the call's own keys.

Context: ``merge_contextvars`` runs first.  ``message_context(envelope)`` binds ``correlation_id``,
``causation_id``, ``message_id`` and ``message_type`` for the message being handled and restores what
was bound before when it exits, so nothing leaks into the next message handled by the same task
(nats-py runs every callback of a subscription in one task).  Tasks copy the context when they are
created, so concurrent handlers never see each other's ids.

Secrets: ``redact_secrets`` runs on every event before it leaves structlog (so any handler sees it
masked) and on third-party records and rendered exceptions in the formatter; it masks

* the value of any key named like a secret (``password``, ``token``, ``secret``, ``authorization``,
  ``api_key``, ``*_key``, ``cookie``, ``credential`` …; ``idempotency_key``, ``routing_key`` and file
  paths such as ``key_file`` stay readable);
* inside any string: ``Bearer …`` / ``Basic …`` credentials, the password of a URL
  (``amqp://u:***@h``), ``password=…``-style pairs, roost API tokens (``roost_…``), PEM private keys,
  and every value registered with ``register_secret`` (the secret store registers what it hands out).

Logs go to stderr by default, keeping stdout for what a command prints.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import date, datetime
from enum import Enum
from pathlib import PurePath
from typing import Any, Literal, TextIO
from uuid import UUID

import structlog
from pydantic import SecretBytes, SecretStr
from structlog.types import EventDict, Processor, WrappedLogger

from schemas.envelope import Envelope

LogFormat = Literal["json", "console", "auto"]
MASK = "***"

# The context keys of the message in hand.
MESSAGE_KEYS = ("correlation_id", "causation_id", "message_id", "message_type")
_ALIASES = {
    "correlationid": "correlation_id",
    "causationid": "causation_id",
    "id": "message_id",
    "type": "message_type",
}

# Third-party loggers and the level they are held at (their INFO is connection chatter per request).
_QUIET_LOGGERS = {"uvicorn.access": logging.WARNING, "asyncio": logging.WARNING}


# -- redaction ----------------------------------------------------------------------------------

_SENSITIVE_SUBSTRINGS = ("password", "passwd", "passphrase", "secret", "token", "authorization", "apikey",
                         "api_key", "api-key", "credential", "cookie", "private_key", "privatekey")
_SENSITIVE_PARTS = frozenset({"key", "pwd", "pass", "auth", "hmac", "psk", "bearer", "signature"})
_READABLE_KEYS = frozenset({"idempotency_key", "idempotencykey", "routing_key", "key_file", "cert_file", "ca_file",
                            "broker_key_file", "database_key_file", "token_name", "secret_name", "sort_key",
                            "partition_key"})

_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "Bearer abc", "Basic dXNlcjpwdw==" (also inside "Authorization: Bearer abc")
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{4,}"), rf"\1\2{MASK}"),
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@'\"]*):[^\s@/'\"]+@"), rf"\1:{MASK}@"),
    # NATS token auth: nats://token@host, tls://token@host
    (re.compile(r"(?i)\b(nats|tls)://[^\s:@/'\"]+@"), rf"\1://{MASK}@"),
    # password=…, token: …, secret=… in free text and query strings
    (re.compile(r"(?i)\b((?:ssl)?password|passwd|pwd|secret|token|api[_-]?key)(\s*[=:]\s*)(?![*]{3})"
                r"(\"[^\"]*\"|'[^']*'|[^\s&,;'\"}]+)"),
     rf"\1\2{MASK}"),
    # roost API tokens (the random part has an upper-case letter or a digit; metric names have neither)
    (re.compile(r"\broost_(?=[A-Za-z0-9_-]{0,42}[A-Z0-9])[A-Za-z0-9_-]{40,}"), f"roost_{MASK}"),
    # PEM private keys
    (re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     f"-----BEGIN \\1PRIVATE KEY-----{MASK}"),
)

_known_lock = threading.Lock()
_known_secrets: set[str] = set()
_known_pattern: re.Pattern[str] | None = None
_MIN_REGISTERED_LEN = 8


def register_secret(value: str | bytes | SecretStr | SecretBytes | None) -> None:
    """Mask every occurrence of ``value`` in logs from now on (whatever key or text it appears in).

    Bytes are also registered as hex and base64, the forms a key is usually printed in.  Values
    shorter than 8 characters are ignored (they would mask ordinary words).
    """
    if value is None:
        return
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    forms: list[str] = []
    if isinstance(value, bytes):
        forms += [value.hex(), base64.b64encode(value).decode(), base64.urlsafe_b64encode(value).decode()]
        with suppress(UnicodeDecodeError):
            forms.append(value.decode())
    else:
        forms.append(value)
    global _known_pattern
    with _known_lock:
        added = {f.strip() for f in forms if len(f.strip()) >= _MIN_REGISTERED_LEN} - _known_secrets
        if not added:
            return
        _known_secrets.update(added)
        ordered = sorted(_known_secrets, key=len, reverse=True)
        _known_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def is_sensitive_key(key: str) -> bool:
    """True when a key's name says its value is a secret."""
    # split camelCase before lower-casing: "apiKey" -> "api_key"
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()
    if snake in _READABLE_KEYS or key.lower() in _READABLE_KEYS:
        return False
    if any(s in snake for s in _SENSITIVE_SUBSTRINGS):
        return True
    parts = [p for p in re.split(r"[^a-z0-9]+", snake) if p]
    if not parts:
        return False
    return any(p in _SENSITIVE_PARTS for p in parts) or parts[-1].endswith("key")


def redact_text(text: str) -> str:
    """``text`` with every secret-looking substring masked (see the module docstring)."""
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for regex, replacement in _VALUE_PATTERNS:
        text = regex.sub(replacement, text)
    return text


def redact_value(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with secrets masked: strings are scanned, containers walked, secret
    types masked, other objects turned into their (scanned) ``repr``."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if _depth > 8:
        return MASK
    if isinstance(value, Mapping):
        return {k: (MASK if isinstance(k, str) and is_sensitive_key(k) and v not in (None, "")
                    else redact_value(v, _depth + 1))
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, _depth + 1) for v in value]
    if isinstance(value, bytes):
        return redact_text(repr(value))
    if isinstance(value, datetime | date | UUID | PurePath | Enum):
        return redact_text(str(value.value if isinstance(value, Enum) else value))
    return redact_text(repr(value))


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in every key and value of the event."""
    for key, value in list(event_dict.items()):
        if key.startswith("_"):
            continue
        if is_sensitive_key(key) and value not in (None, ""):
            event_dict[key] = MASK
        else:
            event_dict[key] = redact_value(value)
    return event_dict


def _redact_in_formatter(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """The formatter's pass: a structlog event was redacted before it left structlog (so any other
    handler on the root logger gets it masked too) and only its rendered exception is left to scan;
    a stdlib record is redacted whole."""
    if event_dict.get("_from_structlog", False):
        if "exception" in event_dict:
            event_dict["exception"] = redact_value(event_dict["exception"])
        return event_dict
    return redact_secrets(logger, method_name, event_dict)


# -- message context ----------------------------------------------------------------------------

def message_fields(source: Envelope | Mapping[str, Any] | None) -> dict[str, Any]:
    """The context keys for a message: from an envelope, or from a mapping (CloudEvents names
    ``id``, ``type``, ``correlationid``, ``causationid`` are accepted too)."""
    fields: dict[str, Any] = dict.fromkeys(MESSAGE_KEYS)
    if source is None:
        return fields
    if isinstance(source, Envelope):
        fields.update(correlation_id=source.correlationid, causation_id=source.causationid,
                      message_id=source.id, message_type=source.type)
        return fields
    for key, value in source.items():
        fields[_ALIASES.get(key, key)] = value
    return fields


# One context variable holds the fields of the message in hand; ``merge_message_context`` expands them
# into a log line only when one is written.  (Binding each field as its own structlog context variable
# cost ~10 µs per message on the bus's hot path, logged or not.)
_MESSAGE: ContextVar[Mapping[str, Any] | None] = ContextVar("roost_message", default=None)


@contextmanager
def message_context(source: Envelope | Mapping[str, Any] | None = None, **extra: Any) -> Iterator[None]:
    """Bind the ids of the message in hand (and ``extra``, e.g. ``group``, ``attempt``) for the logs.

    Every message key is bound, ``None`` when the message has none, so a message handled inside
    another's handler never shows the outer one's ids.  On exit the previous message (or none) is
    restored, whatever the handler did.
    """
    fields = message_fields(source)
    fields.update(extra)
    token = _MESSAGE.set(fields)
    try:
        yield
    finally:
        _MESSAGE.reset(token)


def current_message_fields() -> dict[str, Any]:
    """The fields ``message_context`` has bound in this context (empty outside one)."""
    return dict(_MESSAGE.get() or {})


def merge_message_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: the message in hand's fields, under what the log call itself passes."""
    fields = _MESSAGE.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


# -- configuration ------------------------------------------------------------------------------

class _RoostHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def _exception_processor(json: bool) -> Processor:
    if json:
        # locals are never rendered: they hold passwords and keys more often than not
        return structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    return structlog.processors.format_exc_info


def resolve_format(format: LogFormat, stream: TextIO) -> Literal["json", "console"]:
    if format != "auto":
        return format
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure_logging(format: LogFormat = "auto", level: str | int = "INFO", *,
                      stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger for this process.  Safe to call again.

    ``format``: ``json`` (one JSON object per line), ``console`` (aligned, coloured on a terminal)
    or ``auto`` (console when ``stream`` is a terminal).  ``stream`` defaults to stderr.
    """
    out = stream if stream is not None else sys.stderr
    fmt = resolve_format(format, out)
    numeric = level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_message_context,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        timestamper,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        isatty = getattr(out, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            redact_secrets,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        context_class=dict,
        # Not cached: reconfiguring (tests, ``roost up`` after reading its settings) takes effect for
        # module-level loggers too.  Logging is not on the per-message fast path.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            _exception_processor(fmt == "json"),
            _redact_in_formatter,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = _RoostHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RoostHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, quiet in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet, numeric))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn installs its own handlers when it configures logging; ours renders its records
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)


def reset_logging() -> None:
    """Undo ``configure_logging``: structlog's defaults, our handler off the root logger (tests)."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RoostHandler)]:
        root.removeHandler(old)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
