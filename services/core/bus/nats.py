"""The bus on NATS JetStream (nats-py).

Layout on the server:

* one file-backed stream per domain, ``ROOST_<DOMAIN>`` holding ``roost.<domain>.>`` (``stream_name`` /
  ``domain_of``), created on demand with limits retention and a duplicate window for ``Nats-Msg-Id``
  dedup; dead letters (``roost.dlq.<group>``) land in ``ROOST_DLQ`` the same way;
* one durable pull consumer per (group, pattern), named ``durable_name(group, pattern)``, filtered on the
  pattern; the members of a group share it (see ``nats_consumer``);
* replies to commands travel on core NATS to an inbox of the requesting transport (``_INBOX.<id>.<token>``).

Publishing waits for the stream's PubAck (the publish is a core-NATS request to the stream, answered to an
inbox this transport owns, so many can be in flight without one task each).  A command is published only
when a durable consumer's filter matches its subject (else ``Unroutable``).

nats-py gives up reconnecting after 60 attempts by default; this transport reconnects forever once it has
connected, but the first connect fails after a bounded time with one clear line (``NotConnected``).

What it asks of the server (for NATS permissions): ``$JS.API.INFO`` on connect; publishes on the message
subjects with replies to ``<inbox_prefix>.>``; ``$JS.API.STREAM.INFO/CREATE/UPDATE.<stream>`` only when a
publish or a consumer finds its stream missing (dead letters: ``ROOST_DLQ``); per group
``$JS.API.CONSUMER.CREATE.<stream>.<durable>.<pattern>``, ``CONSUMER.INFO``, ``CONSUMER.DELETE`` and
``CONSUMER.MSG.NEXT.<stream>.<durable>``, ``$JS.ACK.<stream>.<durable>.>``; for commands
``$JS.API.CONSUMER.LIST.ROOST_CMD`` (is any group bound?); replies to any ``_INBOX.>`` address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from nats.nuid import NUID

from services.core.bus.abc import (
    H_REPLY_TO,
    BusError,
    ConsumeCallback,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    ReceivedMessage,
    RequestTimeout,
    Subscription,
    Transport,
    Unroutable,
)
from services.core.bus.nats_consumer import NatsSubscription
from services.core.bus.subjects import (
    check_group,
    check_pattern,
    check_subject,
    domain_of,
    durable_name,
    is_command,
    matches,
    stream_name,
)

log = structlog.get_logger("roost.bus.nats")

HDR_MSG_ID = "Nats-Msg-Id"
STATUS = "Status"
NO_RESPONDERS = "503"
ERR_STREAM_NAME_IN_USE = 10058
ERR_STREAM_NOT_FOUND = 10059
SHARED_INBOX_ROOT = "_INBOX."
ROUTES_TTL = 2.0          # seconds a positive "some group takes this command" answer is trusted


def redact(url: str) -> str:
    """A server URL fit for logs and errors: user, password or token replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def _describe(exc: BaseException) -> str:
    """One line for an exception from nats-py, whose messages are often empty."""
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
        return "authorization violation (check the user, password, token or credentials)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return "timed out"
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (code {exc.err_code or exc.code})"
    text = str(exc).strip()
    text = text.removeprefix("nats: ").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _NoStream(BusError):
    """Nothing stored the publish: no stream holds the subject (a 503 "no responders")."""


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """Retention of the per-domain streams.  Defaults keep a week of events and dead letters forever."""

    max_age: float | None = 7 * 24 * 3600.0      # seconds; None keeps messages until max_bytes
    max_bytes: int | None = None
    dlq_max_age: float | None = None              # dead letters stay until an operator handles them
    duplicate_window: float = 120.0               # Nats-Msg-Id dedup horizon (seconds)
    replicas: int = 1
    # consumer groups per stream: set, because nats-server 2.15 defaults to 1,000 per stream, and the command
    # stream holds one group per subcloud agent besides every service's
    max_consumers: int = 100_000


class _Routes:
    """A stream's consumer filters as listed at ``at``, indexed by their literal leading tokens (a subject is
    matched against the few filters whose literal part it starts with, not against a thousand), and the
    subjects already answered."""

    __slots__ = ("_answers", "_by_prefix", "at")

    def __init__(self, at: float, filters: list[str]) -> None:
        self.at = at
        self._by_prefix: dict[tuple[str, ...], list[str]] = {}
        for f in filters:
            literal: list[str] = []
            for token in f.split("."):
                if token in ("*", ">"):
                    break
                literal.append(token)
            self._by_prefix.setdefault(tuple(literal), []).append(f)
        self._answers: dict[str, bool] = {}

    def takes(self, subject: str) -> bool:
        answer = self._answers.get(subject)
        if answer is None:
            if len(self._answers) > 10_000:
                self._answers.clear()
            tokens = tuple(subject.split("."))
            answer = self._answers[subject] = any(
                matches(f, subject) for i in range(len(tokens) + 1) for f in self._by_prefix.get(tokens[:i], ()))
        return answer


class NatsTransport(Transport):
    """A ``Transport`` on NATS JetStream.

    ``servers``: one URL, a comma-separated list or a sequence (``nats://`` or ``tls://``; credentials may
    be in the URL).  ``user``/``password``, ``token`` or ``creds`` (a ``.creds`` file) authenticate;
    ``tls`` is an ``ssl.SSLContext`` for ``tls://`` servers.
    """

    name = "nats"

    def __init__(self, servers: str | Sequence[str], *, user: str | None = None, password: str | None = None,
                 token: str | None = None, creds: str | Path | None = None, tls: ssl.SSLContext | None = None,
                 tls_hostname: str | None = None, client_name: str = "roost", inbox_prefix: str = "_INBOX",
                 connect_timeout: float = 5.0, reconnect_time_wait: float = 1.0, api_timeout: float = 5.0,
                 ping_interval: float = 2.0, max_outstanding_pings: int = 2,
                 publish_window: int = 256, settle_timeout: float = 5.0,
                 streams: StreamPolicy = StreamPolicy()) -> None:
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        if not servers:
            raise ValueError("NatsTransport needs at least one server URL")
        self.servers = list(servers)
        self._user = user
        self._password = password
        self._token = token
        self._creds = str(creds) if creds is not None else None
        self._tls = tls
        self._tls_hostname = tls_hostname
        self.client_name = client_name
        self.inbox_prefix = inbox_prefix
        self.connect_timeout = connect_timeout
        self.reconnect_time_wait = reconnect_time_wait
        self.api_timeout = api_timeout
        # A silent partition is noticed only by unanswered pings: nats-py's default (120 s x 2) would keep
        # `connected` true for minutes; 2 s x 2 turns it false within about 6 s.
        self.ping_interval = ping_interval
        self.max_outstanding_pings = max_outstanding_pings
        self.publish_window = max(1, publish_window)
        self.settle_timeout = settle_timeout
        self.streams = streams
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._nuid = NUID()
        self._waiters: dict[str, asyncio.Future[Msg]] = {}
        self._known_streams: set[str] = set()
        self._stream_lock = asyncio.Lock()
        self._routes: dict[str, _Routes] = {}
        self._route_lookups: dict[str, asyncio.Future[list[str]]] = {}
        self._subscriptions: set[NatsSubscription] = set()
        self._up = asyncio.Event()
        self._closing = False
        self._connect_errors: list[BaseException] = []
        self._last_error = ""

    # -- connection -------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return ", ".join(redact(s) for s in self.servers)

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        self._closing = False
        self._connect_errors = []
        nc = NatsClient()
        options: dict[str, Any] = dict(
            servers=self.servers, name=self.client_name, inbox_prefix=self.inbox_prefix,
            connect_timeout=self.connect_timeout, reconnect_time_wait=self.reconnect_time_wait,
            allow_reconnect=True, ping_interval=self.ping_interval, max_outstanding_pings=self.max_outstanding_pings,
            # nats-py's first connect loops forever with -1: try each server twice, then give up;
            # switched to -1 (reconnect forever) once connected.
            max_reconnect_attempts=1,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
        )
        if self._user is not None:
            options["user"] = self._user
        if self._password is not None:
            options["password"] = self._password
        if self._token is not None:
            options["token"] = self._token
        if self._creds is not None:
            options["user_credentials"] = self._creds
        if self._tls is not None:
            options["tls"] = self._tls
        if self._tls_hostname is not None:
            options["tls_hostname"] = self._tls_hostname
        bound = len(self.servers) * 2 * (self.connect_timeout + self.reconnect_time_wait) + self.connect_timeout
        try:
            await asyncio.wait_for(nc.connect(**options), bound)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise NotConnected(f"cannot connect to NATS at {self.where}: {self._connect_reason(exc)}") from None
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._js = nc.jetstream(timeout=self.api_timeout)
        self._inbox = f"{self.inbox_prefix}.{self._nuid.next().decode()}"
        try:
            await nc.subscribe(f"{self._inbox}.*", cb=self._on_inbox)
            await self._js.account_info()
        except Exception as exc:
            self._nc = None
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
                raise NotConnected(f"NATS at {self.where} has no JetStream (start nats-server with -js)") from None
            raise NotConnected(f"NATS at {self.where} did not answer the JetStream API: {_describe(exc)}") from None
        self._up.set()
        log.info("connected to NATS", server=redact(str(nc.connected_url.geturl())) if nc.connected_url else "")

    def _connect_reason(self, final: BaseException) -> str:
        """The most telling of the errors seen while connecting: a refused login or a TLS failure says more
        than the connection reset that follows it."""
        reasons = [_describe(e) for e in self._connect_errors] or [_describe(final)]
        for marker in ("authorization violation", "TLS error"):
            for reason in reasons:
                if reason.startswith(marker):
                    return reason
        return reasons[-1]

    async def close(self) -> None:
        self._closing = True
        for sub in list(self._subscriptions):
            await sub.stop()
        await self._disconnect()

    async def abort(self) -> None:
        self._closing = True
        for sub in list(self._subscriptions):
            sub.kill()
        self._subscriptions.clear()
        await self._disconnect()

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._up.clear()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(NotConnected("transport closed"))
        self._waiters.clear()
        self._known_streams.clear()
        self._routes.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 10)

    @property
    def closing(self) -> bool:
        """``close()`` or ``abort()`` is under way."""
        return self._closing

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _client(self) -> NatsClient:
        nc = self._nc
        if nc is None or nc.is_closed:
            raise NotConnected("the NATS transport is not connected")
        return nc

    def _jetstream(self) -> JetStreamContext:
        self._client()
        assert self._js is not None
        return self._js

    async def wait_up(self) -> None:
        """Until the connection is up (subscriptions wait here while NATS is away)."""
        await self._up.wait()

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None:                      # still connecting: connect() reports the last one
            self._connect_errors.append(exc)
            return
        text = _describe(exc)
        if text != self._last_error:              # once per distinct error, not once per reconnect attempt
            self._last_error = text
            log.warning("NATS connection error", server=self.where, error=text)

    async def _on_disconnected(self) -> None:
        self._up.clear()
        if self._nc is not None and not self._closing:
            log.warning("lost the connection to NATS; reconnecting", server=self.where)

    async def _on_reconnected(self) -> None:
        self._last_error = ""
        self._routes.clear()
        self._up.set()
        log.info("reconnected to NATS", server=self.where)
        for sub in list(self._subscriptions):
            sub.on_reconnected()

    async def _on_closed(self) -> None:
        self._up.clear()

    # -- the inbox: PubAcks and replies -----------------------------------------------------

    async def _on_inbox(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1:]
        future = self._waiters.pop(token, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _expect(self, timeout: float) -> tuple[str, asyncio.Future[Msg]]:
        """A fresh inbox address and the future its first message completes (failing after ``timeout``)."""
        loop = asyncio.get_running_loop()
        token = self._nuid.next().decode()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiters[token] = future
        timer = loop.call_later(max(0.0, timeout), self._expire, token)
        future.add_done_callback(lambda _: timer.cancel())
        return f"{self._inbox}.{token}", future

    def _expire(self, token: str) -> None:
        future = self._waiters.pop(token, None)
        if future is not None and not future.done():
            future.set_exception(TimeoutError())

    def _forget(self, address: str) -> None:
        future = self._waiters.pop(address[len(self._inbox) + 1:], None)
        if future is not None and not future.done():
            future.cancel()

    # -- streams ----------------------------------------------------------------------------

    def _stream_config(self, domain: str) -> js_api.StreamConfig:
        dlq = domain == "dlq"
        return js_api.StreamConfig(
            name=stream_name(domain),
            description="roost: dead letters" if dlq else f"roost: the {domain} domain",
            subjects=[f"roost.{domain}.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            discard=js_api.DiscardPolicy.OLD,
            max_age=self.streams.dlq_max_age if dlq else self.streams.max_age,
            max_bytes=self.streams.max_bytes,
            duplicate_window=self.streams.duplicate_window,
            num_replicas=self.streams.replicas,
            max_consumers=self.streams.max_consumers,
        )

    async def ensure_stream(self, domain: str) -> str:
        """The stream of ``domain``, created if missing (cached once seen)."""
        name = stream_name(domain)
        if name in self._known_streams:
            return name
        js = self._jetstream()
        wanted = self._stream_config(domain)
        subject = f"roost.{domain}.>"
        async with self._stream_lock:
            if name in self._known_streams:
                return name
            try:
                try:
                    info = await js.stream_info(name)
                except nats.js.errors.NotFoundError:
                    try:
                        await js.add_stream(wanted)
                        log.info("created stream", stream=name, subjects=wanted.subjects)
                    except nats.js.errors.APIError as exc:
                        if exc.err_code != ERR_STREAM_NAME_IN_USE:     # another process made it first
                            raise
                else:
                    subjects = list(info.config.subjects or [])
                    if subject not in subjects:      # two domains that map to one name (Foo-bar, foo_bar)
                        info.config.subjects = [*subjects, subject]
                        await js.update_stream(info.config)
            except (TimeoutError, nats.errors.Error) as exc:
                raise self._api_failure(f"cannot create or find stream {name}", exc) from None
            self._known_streams.add(name)
        return name

    def _api_failure(self, what: str, exc: BaseException) -> BusError:
        if not self.connected:
            return NotConnected(f"{what}: not connected to NATS at {self.where}")
        return BusError(f"{what}: {_describe(exc)}")

    async def _consumer_filters(self, stream: str) -> list[str]:
        """The filter subjects of the stream's durable consumers; none when the stream does not exist."""
        js = self._jetstream()
        filters: list[str] = []
        offset = 0
        while True:
            try:
                page = await js.consumers_info(stream, offset=offset)
            except nats.js.errors.NotFoundError:
                return []
            for consumer in page:
                config = consumer.config
                if not config.durable_name:
                    continue                       # ephemeral (someone inspecting): not a group
                if config.filter_subjects:
                    filters.extend(config.filter_subjects)
                else:
                    filters.append(config.filter_subject or ">")
            if len(page) < 256:
                return filters
            offset += len(page)

    async def _check_routable(self, subject: str) -> None:
        stream = stream_name(domain_of(subject))
        routes = self._routes.get(stream)
        if routes is not None and time.monotonic() - routes.at < ROUTES_TTL and routes.takes(subject):
            return
        filters = await self._lookup_routes(stream, subject)
        routes = self._routes[stream] = _Routes(time.monotonic(), filters)
        if not routes.takes(subject):
            raise Unroutable(f"no consumer group is bound to {subject}")

    async def _lookup_routes(self, stream: str, subject: str) -> list[str]:
        """The stream's consumer filters, listed once for every publish that asks meanwhile (with a thousand
        consumers, a listing is several pages of JSON)."""
        while True:
            pending = self._route_lookups.get(stream)
            if pending is None:
                return await self._list_routes(stream, subject)
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    continue            # the publish that listed was cancelled, not this one: list again
                raise

    async def _list_routes(self, stream: str, subject: str) -> list[str]:
        pending: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._route_lookups[stream] = pending
        try:
            filters = await self._consumer_filters(stream)
        except (TimeoutError, nats.errors.Error) as exc:
            failure = self._api_failure(f"cannot tell whether a group handles {subject}", exc)
            pending.set_exception(failure)
            pending.exception()         # retrieved: the waiters, if any, raise it too
            raise failure from None
        except BaseException:
            pending.cancel()
            raise
        else:
            pending.set_result(filters)
            return filters
        finally:
            self._route_lookups.pop(stream, None)

    # -- publishing -------------------------------------------------------------------------

    @staticmethod
    def _headers(message: OutgoingMessage, dedup_id: str | None = None) -> dict[str, str]:
        headers = dict(message.headers)
        headers[HDR_MSG_ID] = dedup_id or message.message_id
        return headers

    async def _send(self, message: OutgoingMessage, headers: Mapping[str, str],
                    timeout: float) -> asyncio.Future[Msg]:
        """Hand the message to the server; the future completes with the stream's answer."""
        nc = self._client()
        address, future = self._expect(timeout)
        try:
            await nc.publish(message.subject, message.body, reply=address, headers=dict(headers))
        except nats.errors.ConnectionClosedError:
            self._forget(address)
            raise NotConnected(f"not connected to NATS at {self.where}") from None
        except (nats.errors.Error, OSError) as exc:
            self._forget(address)
            raise PublishFailed(f"{message.subject} not sent: {_describe(exc)}") from None
        return future

    def _pub_ack(self, message: OutgoingMessage, answer: Msg) -> None:
        if answer.headers and answer.headers.get(STATUS) == NO_RESPONDERS:
            raise _NoStream(f"no stream holds {message.subject}")
        try:
            response = json.loads(answer.data)
        except ValueError:
            raise PublishFailed(f"{message.subject}: unreadable answer from JetStream") from None
        error = response.get("error") if isinstance(response, dict) else None
        if error:
            raise PublishFailed(f"{message.subject} not stored: {error.get('description', error)} "
                                f"(code {error.get('err_code', error.get('code'))})")
        if not isinstance(response, dict) or "stream" not in response:
            raise PublishFailed(f"{message.subject}: unexpected answer from JetStream")

    async def _prepare(self, subject: str) -> None:
        """Before publishing: commands need a group bound.  Streams are not looked up first: a publish
        nothing stores comes back as "no responders" and then the stream is created (one round trip less
        per publish, and no stream-info permission needed while the stream exists)."""
        check_subject(subject)
        if is_command(subject):
            await self._check_routable_or_fail(subject)

    async def _publish(self, message: OutgoingMessage, *, timeout: float, dedup_id: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        await self._prepare(message.subject)
        headers = self._headers(message, dedup_id)
        for attempt in (1, 2):
            future = await self._send(message, headers, max(0.0, deadline - time.monotonic()))
            try:
                answer = await future
            except TimeoutError:
                raise PublishFailed(f"{message.subject} not confirmed by JetStream within {timeout}s") from None
            try:
                self._pub_ack(message, answer)
                return
            except _NoStream:
                await self._no_stream(message, final=attempt == 2)

    async def _no_stream(self, message: OutgoingMessage, *, final: bool) -> None:
        """Nothing stored the publish.  An event's stream is new, deleted or wiped: create it (the caller
        publishes again).  A command: unroutable if no group is bound (the group may have been deleted
        since the cached answer), else JetStream is not answering (shutting down) and it was not stored."""
        subject = message.subject
        if is_command(subject):
            self._routes.pop(stream_name(domain_of(subject)), None)
            await self._check_routable_or_fail(subject)
            raise PublishFailed(f"{subject} not stored: JetStream did not take it (stream unavailable)")
        if final:
            raise PublishFailed(f"{subject} not stored: no stream holds it")
        self._known_streams.discard(stream_name(domain_of(subject)))
        try:
            await self.ensure_stream(domain_of(subject))
        except NotConnected:
            raise
        except BusError as exc:
            raise PublishFailed(f"{subject} not stored: {exc}") from None

    async def _check_routable_or_fail(self, subject: str) -> None:
        """``_check_routable``, with a failure to find out reported as a failed publish."""
        try:
            await self._check_routable(subject)
        except (NotConnected, Unroutable):
            raise
        except BusError as exc:
            raise PublishFailed(f"{subject} not published: {exc}") from None

    async def publish(self, message: OutgoingMessage, *, timeout: float = 10.0) -> None:
        await self._publish(message, timeout=timeout)

    async def publish_dead_letter(self, message: OutgoingMessage, dedup_id: str, *, timeout: float) -> None:
        """For deliveries: store a dead letter, deduplicated by ``dedup_id`` (unique per stored original)."""
        await self._publish(message, timeout=timeout, dedup_id=dedup_id)

    async def publish_many(self, messages: Sequence[OutgoingMessage], *,
                           timeout: float = 10.0) -> list[BaseException | None]:
        """At most ``publish_window`` PubAcks outstanding; no task per message."""
        results: list[BaseException | None] = [None] * len(messages)
        window = asyncio.Semaphore(self.publish_window)
        pending: list[tuple[int, asyncio.Future[Msg]]] = []
        retry: list[int] = []
        for i, message in enumerate(messages):
            if window.locked():                   # (wait_for only when full: it costs a task and a yield,
                try:                              # and not yielding lets nats-py write many at once)
                    await asyncio.wait_for(window.acquire(), timeout)
                except TimeoutError:
                    results[i] = PublishFailed(f"{message.subject}: no room in the publish window within {timeout}s")
                    continue
            else:
                await window.acquire()
            try:
                await self._prepare(message.subject)
                future = await self._send(message, self._headers(message), timeout)
            except (BusError, ValueError) as exc:
                window.release()
                results[i] = exc
                continue
            future.add_done_callback(lambda _: window.release())
            pending.append((i, future))
        for i, future in pending:
            message = messages[i]
            try:
                self._pub_ack(message, await future)
            except TimeoutError:
                results[i] = PublishFailed(f"{message.subject} not confirmed by JetStream within {timeout}s")
            except _NoStream:
                retry.append(i)
            except BusError as exc:
                results[i] = exc
        for i in retry:                           # a stream vanished under us: the slow path re-creates it
            try:
                await self._publish(messages[i], timeout=timeout)
            except (BusError, ValueError) as exc:
                results[i] = exc
        return results

    # -- consumer groups --------------------------------------------------------------------

    def consumer_config(self, pattern: str, group: str, options: ConsumerOptions,
                        since: datetime | None = None) -> js_api.ConsumerConfig:
        name = durable_name(group, pattern)
        return js_api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=f"roost group {group} for {pattern}",
            filter_subject=pattern,
            # Like a queue bound now: a new group starts with what is published from now on.  A group
            # whose consumer vanished under a running member (a wiped store, a deletion) is re-created
            # from the last moment the member saw it alive, so what came in between is not skipped.
            deliver_policy=js_api.DeliverPolicy.NEW if since is None else js_api.DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=options.ack_wait,
            # Unlimited: the bus layer dead-letters on arrival once attempt > max_attempts.  A server-side
            # MaxDeliver would instead park the message silently (only an advisory says so) whenever the
            # dead-lettering delivery itself was lost, and dead letters must be retried forever.
            max_deliver=-1,
            # Consumer-wide, across all members: each member bounds itself to its prefetch when pulling.
            max_ack_pending=max(1000, 10 * options.prefetch),
            replay_policy=js_api.ReplayPolicy.INSTANT,
            mem_storage=True if options.state_in_memory else None,
        )

    async def ensure_consumer(self, stream: str, pattern: str, group: str, options: ConsumerOptions,
                              since: datetime | None = None) -> str:
        """Create the group's durable consumer, or update the fields the server allows to change."""
        js = self._jetstream()
        config = self.consumer_config(pattern, group, options, since)
        assert config.durable_name is not None
        try:
            await js.add_consumer(stream, config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                self._known_streams.discard(stream)
                raise _NoStream(f"no stream {stream}") from None
            # An existing consumer whose unchangeable fields differ (e.g. made by an older roost): use it.
            try:
                await js.consumer_info(stream, config.durable_name)
            except (TimeoutError, nats.errors.Error):
                raise self._api_failure(f"cannot create consumer {config.durable_name}", exc) from None
            log.warning("using an existing consumer whose configuration differs", stream=stream,
                        consumer=config.durable_name, error=_describe(exc))
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._api_failure(f"cannot create consumer {config.durable_name}", exc) from None
        self._routes.pop(stream, None)
        return config.durable_name

    async def recover_consumer(self, pattern: str, group: str, options: ConsumerOptions, since: datetime) -> None:
        """A member found its consumer gone: make sure the stream and the consumer exist again."""
        domain = domain_of(pattern)
        stream = stream_name(domain)
        try:
            await self._jetstream().consumer_info(stream, durable_name(group, pattern))
            return                                # it exists (the server was only slow to load it)
        except nats.js.errors.NotFoundError:
            pass
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._api_failure(f"cannot look up consumer {durable_name(group, pattern)}", exc) from None
        log.warning("consumer vanished; creating it again", stream=stream, group=group, pattern=pattern,
                    since=since.isoformat())
        try:
            await self.ensure_consumer(stream, pattern, group, options, since)
        except _NoStream:
            await self.ensure_stream(domain)
            await self.ensure_consumer(stream, pattern, group, options, since)

    async def subscribe(self, pattern: str, group: str, callback: ConsumeCallback,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        self._client()
        check_pattern(pattern)
        check_group(group)
        domain = domain_of(pattern)
        stream = stream_name(domain)
        try:
            consumer = await self.ensure_consumer(stream, pattern, group, options)
        except _NoStream:
            await self.ensure_stream(domain)
            consumer = await self.ensure_consumer(stream, pattern, group, options)
        sub = NatsSubscription(self, stream, consumer, pattern, group, callback, options)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    def forget(self, sub: NatsSubscription) -> None:
        self._subscriptions.discard(sub)

    async def delete_group(self, pattern: str, group: str) -> None:
        check_pattern(pattern)
        check_group(group)
        stream = stream_name(domain_of(pattern))
        consumer = durable_name(group, pattern)
        for sub in [s for s in self._subscriptions if s.consumer == consumer and s.stream == stream]:
            await sub.stop()                      # our own members would otherwise re-create it
        js = self._jetstream()
        try:
            await js.delete_consumer(stream, consumer)
        except nats.js.errors.NotFoundError:
            pass
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._api_failure(f"cannot delete consumer {consumer}", exc) from None
        self._routes.pop(stream, None)

    # -- request / reply --------------------------------------------------------------------

    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        self._client()
        address, future = self._expect(timeout)           # the timeout covers the publish and the reply
        headers = {**message.headers, H_REPLY_TO: address}
        try:
            await self._publish(OutgoingMessage(message.subject, message.body, message.message_id, headers),
                                timeout=timeout)
            try:
                answer = await future
            except TimeoutError:
                raise RequestTimeout(f"no reply to {message.subject} within {timeout}s") from None
        finally:
            self._forget(address)
        return ReceivedMessage(subject=answer.subject, body=answer.data, headers=dict(answer.headers or {}))

    def is_reply_address(self, address: str) -> bool:
        """An inbox: the shared ``_INBOX.`` root (each user may have its own ``_INBOX.<user>`` prefix) or ours."""
        return address.startswith((SHARED_INBOX_ROOT, self.inbox_prefix + "."))

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        nc = self._client()
        if not self.is_reply_address(reply_to):
            # A reply address comes from a message header: never let it aim a publish at a stream subject.
            log.warning("refusing to reply to a subject outside the inbox prefix", reply_to=reply_to[:200])
            return
        try:
            await nc.publish(reply_to, message.body, headers=dict(message.headers) or None)
        except nats.errors.ConnectionClosedError:
            raise NotConnected(f"not connected to NATS at {self.where}") from None

    # -- for the consumer module ------------------------------------------------------------

    def client(self) -> NatsClient:
        return self._client()

    def new_inbox(self) -> str:
        return f"{self.inbox_prefix}.{self._nuid.next().decode()}"

    def __repr__(self) -> str:
        return f"NatsTransport({self.where}, connected={self.connected})"


def transport_factory(url: str, **kwargs: Any) -> Callable[[], NatsTransport]:
    """A factory of unconnected transports to ``url`` (each one is its own connection)."""
    return lambda: NatsTransport(url, **kwargs)
