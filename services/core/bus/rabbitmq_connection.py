"""Connecting to RabbitMQ: the address, TLS, the robust connection, and errors worded for operators.

Nothing here ever puts a password into a message or a log line: addresses are shown through
``redact()``, and exception texts pass through ``describe()`` which removes the password as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from services.core.bus.abc import NotConnected

# What a lost connection or channel looks like to a caller of aio-pika / aiormq.  ``RuntimeError``
# covers aiormq's ``ChannelInvalidStateError`` and aio-pika's "connection closed" errors.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.AMQPChannelError,
    ConnectionError,
    OSError,
    RuntimeError,
)

_PROBE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *CONNECTION_ERRORS)
_SCHEMES = ("amqp", "amqps")
# TLS parameters aiormq reads from an amqps:// URL's query; honoured when the settings name no files.
_URL_TLS_KEYS = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"})


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    """How the RabbitMQ transport connects and publishes.  Every field has a working default."""

    confirm_window: int = 256          # publishes awaiting their confirm at once in publish_many
    connect_timeout: float = 10.0      # seconds for connect() to reach the broker and log in
    reconnect_interval: float = 1.0    # seconds between reconnect attempts after the connection is lost
    heartbeat: int = 2                 # AMQP heartbeat (s): aiormq drops a silent connection after
                                       # (heartbeat + 1) * 3 s and the robust connection reconnects
    liveness_interval: float = 1.0     # seconds between the transport's own round trips to the broker
    liveness_timeout: float = 4.0      # ``connected`` is false when no round trip succeeded for this
                                       # long (a silent partition, a wedged or blocking broker)
    settle_timeout: float = 10.0       # seconds for the confirmed republish behind retry() / dead_letter()
    connection_name: str = "roost"     # shown in the broker's connection list
    declare_shared_topology: bool = True  # False: roost.events / roost.commands / roost.unrouted must
                                          # exist already (checked passively), for broker users without
                                          # ``configure`` permission on them
    # TLS (amqps:// only); an ``ssl_context`` given to the transport takes precedence over these.
    ca_file: str | None = None         # CA bundle that signed the broker's certificate
    cert_file: str | None = None       # client certificate (for brokers that authenticate clients by it)
    key_file: str | None = None        # its private key
    verify_hostname: bool = True

    def __post_init__(self) -> None:
        if self.confirm_window < 1:
            raise ValueError("confirm_window must be at least 1")
        if min(self.connect_timeout, self.settle_timeout, self.liveness_interval, self.liveness_timeout) <= 0:
            raise ValueError("timeouts and intervals must be positive")


def redact(url: str) -> str:
    """The address without its password, for messages and logs."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<unparseable broker URL>"
    if parsed.password is not None:
        parsed = parsed.with_password("***")
    return str(parsed)


def _secret_of(url: str) -> str | None:
    try:
        return URL(url).password or None
    except (ValueError, TypeError):
        return None


def describe(exc: BaseException, url: str) -> str:
    """One line saying why a connection attempt failed, with no secret in it."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        reason = "the broker refused the login (check the user name and password)"
    elif isinstance(exc, TimeoutError):
        reason = "no answer in time"
    elif isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        vhost = URL(url).path or "/"
        reason = f"the broker closed the connection while opening virtual host {vhost!r} " \
                 "(does it exist, and may this user use it?)"
    elif "unexpectedly closed" in str(exc):
        reason = "the peer closed the connection before AMQP was established (not a RabbitMQ port, " \
                 "or TLS that requires a client certificate?)"
    elif isinstance(exc, ssl.SSLError) or "SSL" in str(exc):
        reason = f"TLS handshake failed ({_first_line(exc)})"
    elif isinstance(exc, socket.gaierror) or "Name or service not known" in str(exc):
        reason = "unknown host"
    elif "111" in str(exc.args[:1]) or isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is RabbitMQ running and listening there?)"
    else:
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
    secret = _secret_of(url)
    if secret:
        reason = reason.replace(secret, "***")
    return reason


def summary(exc: BaseException, url: str) -> str:
    """``Type: first line`` of an exception, with no secret in it (for logs of a lost connection)."""
    text = f"{type(exc).__name__}: {_first_line(exc)}"
    secret = _secret_of(url)
    return text.replace(secret, "***") if secret else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_url(url: str) -> URL:
    """Parse the broker address or raise ``NotConnected`` saying what is wrong with it."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise NotConnected(f"bad RabbitMQ URL {redact(url)}: {exc}") from None
    if parsed.scheme not in _SCHEMES:
        raise NotConnected(f"bad RabbitMQ URL {redact(url)}: the scheme must be amqp:// or amqps://")
    if not parsed.host:
        raise NotConnected(f"bad RabbitMQ URL {redact(url)}: no host")
    try:
        _ = parsed.port
    except ValueError:
        raise NotConnected(f"bad RabbitMQ URL {redact(url)}: bad port") from None
    return parsed


def tls_context(settings: RabbitSettings) -> ssl.SSLContext:
    """A client TLS context from the settings: the CA to trust and, optionally, a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)
    context.check_hostname = settings.verify_hostname
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def connection_url(url: URL, settings: RabbitSettings) -> URL:
    """The address with the connection parameters roost relies on (unless the URL sets them)."""
    query: dict[str, Any] = {}
    if "heartbeat" not in url.query:
        query["heartbeat"] = str(settings.heartbeat)
    if "name" not in url.query:
        query["name"] = settings.connection_name
    return make_url(str(url.update_query(query))) if query else url


async def open_connection(url: str, settings: RabbitSettings,
                          ssl_context: ssl.SSLContext | None) -> AbstractRobustConnection:
    """Open a robust connection, or raise ``NotConnected`` with one clear line.

    ``fail_fast`` makes the first attempt's failure an error (rather than retrying forever); once
    connected, the connection reconnects on its own every ``reconnect_interval`` seconds.
    """
    parsed = check_url(url)
    if parsed.scheme == "amqps" and ssl_context is None and (
            settings.ca_file or settings.cert_file or not _URL_TLS_KEYS & set(parsed.query)):
        try:
            ssl_context = tls_context(settings)
        except (OSError, ssl.SSLError) as exc:
            raise NotConnected(f"cannot set up TLS for {redact(url)}: {_first_line(exc)}") from None
    elif parsed.scheme == "amqp" and (ssl_context is not None or settings.cert_file or settings.ca_file):
        raise NotConnected(f"TLS options given for {redact(url)}, which is not amqps://")
    connection = aio_pika.RobustConnection(
        connection_url(parsed, settings), ssl_context=ssl_context,
        reconnect_interval=settings.reconnect_interval, fail_fast=True)
    connecting = _Flag()
    token = _CONNECTING.set(connecting)     # the library's own lines about this attempt stay quiet:
    try:                                    # a failure is one NotConnected line, not three
        async with asyncio.timeout(settings.connect_timeout):
            await connection.connect(timeout=settings.connect_timeout)
    except asyncio.CancelledError:
        await _quietly_close(connection)
        raise
    except TimeoutError:
        await _quietly_close(connection)
        raise NotConnected(f"cannot connect to RabbitMQ at {redact(url)}: "
                           f"no answer within {settings.connect_timeout:g}s") from None
    except Exception as exc:
        await _quietly_close(connection)
        raise NotConnected(f"cannot connect to RabbitMQ at {redact(url)}: {describe(exc, url)}") from None
    finally:
        connecting.on = False               # (tasks started meanwhile share the flag: they log again)
        _CONNECTING.reset(token)
    return connection


class _Flag:
    on = True


_CONNECTING: contextvars.ContextVar[_Flag | None] = contextvars.ContextVar("roost_rabbitmq_connecting",
                                                                          default=None)


class _QuietWhileConnecting(logging.Filter):
    """Drops aio-pika / aiormq records logged on behalf of a first connection attempt still under way
    (the tasks it starts inherit the context, hence the flag); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        flag = _CONNECTING.get()
        return flag is None or not flag.on


_QUIET = _QuietWhileConnecting()
for _name in ("aiormq.connection", "aio_pika.connection", "aio_pika.robust_connection"):
    logging.getLogger(_name).addFilter(_QUIET)


async def _quietly_close(connection: AbstractRobustConnection) -> None:
    with contextlib.suppress(Exception):      # closing a connection that never opened
        await asyncio.wait_for(connection.close(), 5)


class Liveness:
    """Whether the broker answers, measured by a cheap round trip (``basic.qos`` with no limit, on the
    transport's control channel, whose consumers do not ack) every ``interval`` seconds.

    AMQP heartbeats notice a silently dead peer only after (heartbeat + 1) * 3 seconds; readiness
    must turn false sooner.  ``alive`` is false once no round trip has succeeded for ``timeout``
    seconds; it does not close anything (the heartbeat and the robust connection do that).
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self._last_answer = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return asyncio.get_running_loop().time() - self._last_answer <= self.timeout

    def answered(self) -> None:
        self._last_answer = asyncio.get_running_loop().time()

    def start(self, channel: AbstractRobustChannel) -> None:
        self.answered()
        self._task = asyncio.create_task(self._run(channel), name="roost-rabbitmq-liveness")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, channel: AbstractRobustChannel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if not channel.is_closed:
                try:
                    async with asyncio.timeout(self.timeout):
                        underlay = await channel.get_underlay_channel()
                        await underlay.basic_qos(prefetch_count=0)
                    self.answered()
                except _PROBE_ERRORS:
                    pass
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))
