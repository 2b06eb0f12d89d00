"""A lean HTTP/1.1 client for webhook deliveries: POST on keep-alive connections, asyncio streams only.

Why not httpx: a delivery is one small POST whose answer only matters by its status (and ``Retry-After``);
httpx spends about 1 ms of CPU on it (its pool, its models, its hooks), more than everything else the
dispatcher does per delivery together.  This client does what a delivery needs and nothing else:

* ``http://`` and ``https://`` URLs (TLS verified against certifi's CA bundle, SNI; a
  ``user:password@`` in the URL is sent as Basic auth); one client per subscription, reusing up to
  ``max_connections`` idle keep-alive connections per origin;
* ``post(url, body, headers)`` writes the request with ``Content-Length`` and reads the answer: the
  status line (``1xx`` interim answers skipped), the headers (lower-cased names), then at most
  ``max_body`` bytes of its body (``Content-Length``, chunked, or until the peer closes); a connection
  is kept for the next request only when its answer was read completely, is HTTP/1.1 and does not say
  ``Connection: close``;
* no timeout of its own: the caller bounds the whole request (``asyncio.timeout``); a request cancelled
  or failed half-way closes its connection, so a later request never reads a stale answer;
* a keep-alive connection the peer closed while it was idle is noticed when the request gets no byte of
  an answer back on it: the request is then sent once more on a new connection (at most once; an
  answer that breaks off half-way is an error, never resent here).

Errors: ``OSError`` (refused, reset, TLS), ``HttpProtocolError`` (an answer that is not HTTP/1.x or
breaks off), ``TimeoutError`` / cancellation from the caller's bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import certifi

MAX_HEAD_BYTES = 64 * 1024


class HttpProtocolError(Exception):
    """The peer's answer is not usable HTTP/1.x (or ended before it was complete)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]          # lower-cased names; a repeated header keeps its last value


@dataclass(frozen=True, slots=True)
class Target:
    """What a URL means for the wire: where to connect and the request line's pieces; pure."""

    tls: bool
    host: str
    port: int
    path: str
    head: bytes                      # "POST <path> HTTP/1.1" and the Host (and Authorization) lines

    @property
    def origin(self) -> tuple[bool, str, int]:
        return self.tls, self.host, self.port


def parse_target(url: str) -> Target:
    """The target of a webhook URL; ``ValueError`` for anything but an http(s) URL with a host; pure."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook URL must be http:// or https:// with a host")
    tls = scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != (443 if tls else 80):
        shown = f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {shown}"]
    if parts.username is not None or parts.password is not None:
        user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        lines.append(f"Authorization: Basic {base64.b64encode(user_pass).decode('ascii')}")
    text = "\r\n".join(lines) + "\r\n"
    if any(c in text for c in "\0") or any(c.isspace() for c in path):
        raise ValueError("a webhook URL must not hold spaces or control characters")
    return Target(tls, host, port, path, text.encode("latin-1"))


@dataclass(slots=True, eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _header_block(headers: dict[str, str], length: int) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} holds a line break or a colon")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode("latin-1")


@dataclass(slots=True)
class HttpClient:
    """POSTs for one subscription (usually one origin); ``aclose()`` closes its idle connections."""

    max_connections: int = 4
    max_body: int = 64 * 1024        # answer body bytes read at most (the rest is dropped with the connection)
    ssl_context: ssl.SSLContext | None = None
    _idle: dict[tuple[bool, str, int], list[_Connection]] = field(default_factory=dict)
    _targets: dict[str, Target] = field(default_factory=dict)
    _closed: bool = False

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= 64:
                self._targets.clear()
            target = self._targets[url] = parse_target(url)
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        target = self.target(url)
        request = b"".join((target.head, _header_block(headers, len(body)), body))
        reused = self._take(target)
        if reused is not None:
            try:
                return await self._exchange(target, reused, request)
            except _NoAnswer:
                pass        # the peer had closed the idle connection: once more on a new one
        connection = await self._connect(target)
        try:
            return await self._exchange(target, connection, request)
        except _NoAnswer:
            raise HttpProtocolError("the server closed the connection without answering") from None

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    # -- internals --

    def _take(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        return None

    def _give_back(self, target: Target, connection: _Connection) -> None:
        idle = self._idle.setdefault(target.origin, [])
        if self._closed or len(idle) >= self.max_connections:
            connection.close()
        else:
            idle.append(connection)

    def _context(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context(cafile=certifi.where())
        return self.ssl_context

    async def _connect(self, target: Target) -> _Connection:
        if target.tls:
            reader, writer = await asyncio.open_connection(target.host, target.port, ssl=self._context(),
                                                           server_hostname=target.host, limit=MAX_HEAD_BYTES)
        else:
            reader, writer = await asyncio.open_connection(target.host, target.port, limit=MAX_HEAD_BYTES)
        return _Connection(reader, writer)

    async def _exchange(self, target: Target, connection: _Connection, request: bytes) -> Answer:
        """Send ``request`` and read the answer; the connection goes back to the pool only when clean."""
        keep = False
        try:
            try:
                connection.writer.write(request)
                await connection.writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                raise _NoAnswer() from None
            answer, keep = await self._answer(connection.reader)
            return answer
        finally:
            if keep:
                self._give_back(target, connection)
            else:
                connection.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Answer, bool]:
        first = True
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if first and not exc.partial:
                    raise _NoAnswer() from None
                raise HttpProtocolError("the answer ended inside its head") from None
            except ConnectionResetError:
                if first:
                    raise _NoAnswer() from None
                raise
            except asyncio.LimitOverrunError:
                raise HttpProtocolError(f"the answer's head is longer than {MAX_HEAD_BYTES} bytes") from None
            first = False
            status, version, headers = _parse_head(head)
            if 100 <= status < 200 and status != 101:
                continue                    # an interim answer: the final one follows
            break
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if status in (204, 304):
            return Answer(status, headers), keep
        complete = await self._skip_body(reader, headers)
        return Answer(status, headers), keep and complete

    async def _skip_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bool:
        """Read (and drop) the body, at most ``max_body`` bytes; whether it was read to its end."""
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                read = 0
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    try:
                        size = int(size_line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise HttpProtocolError("a malformed chunk size in the answer") from None
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":     # trailers
                            pass
                        return True
                    read += size
                    if read > self.max_body:
                        return False
                    await reader.readexactly(size + 2)
            length = headers.get("content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    raise HttpProtocolError("a malformed Content-Length in the answer") from None
                if n < 0:
                    raise HttpProtocolError("a negative Content-Length in the answer")
                if n > self.max_body:
                    return False
                if n:
                    await reader.readexactly(n)
                return True
            read = 0                        # no length: the body ends when the peer closes
            while read < self.max_body and (chunk := await reader.read(self.max_body - read)):
                read += len(chunk)
            return False
        except asyncio.IncompleteReadError:
            raise HttpProtocolError("the answer's body ended early") from None
        except asyncio.LimitOverrunError:
            raise HttpProtocolError("a chunk line of the answer is too long") from None


class _NoAnswer(Exception):
    """Not one byte of an answer came back (a keep-alive connection the peer had closed)."""


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    version = status_line[0]
    if not version.startswith("HTTP/1.") or len(status_line) < 2 or not status_line[1].isdigit() \
            or len(status_line[1]) != 3:
        raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpProtocolError("a malformed header line in the answer")
        headers[name.strip().lower()] = value.strip()
    return int(status_line[1]), version, headers
