"""A small asyncio TCP proxy that can cut its clients off, to test what a client does when its broker
goes away (and comes back) without touching the broker itself.

    proxy = TcpProxy(target_port=5672)
    await proxy.start()                 # listens on 127.0.0.1:<proxy.port>
    ...connect the client to proxy.port...
    await proxy.disconnect()            # drop every connection at once, refuse new ones
    await proxy.restore()               # accept connections again, on the same port
    await proxy.blackhole()             # keep the connections open but let no byte through (a
                                        # silent partition: only heartbeats can notice it)
    await proxy.stop()

``TcpProxy(..., ssl=context)`` terminates TLS on the listening side and forwards plain TCP, so a
plain broker can be reached over ``amqps://`` (the context decides whether client certificates
are required).

While disconnected the listening socket is closed, so a reconnecting client sees "connection refused"
exactly as if the broker were down; the broker sees its side of every connection reset, so it requeues
what those clients held unacknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    silent: bool = False                         # blackholed: bytes are read and dropped

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()          # no FIN handshake: like a cable pulled out


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672, *,
                 listen_host: str = "127.0.0.1", listen_port: int = 0,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self.port = listen_port or _free_port(listen_host)
        self.ssl = ssl
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.accepted = 0                          # connections accepted since start, for tests to wait on

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def url(self, scheme: str = "amqp", userinfo: str = "guest:guest", path: str = "/") -> str:
        """An address through the proxy, e.g. ``amqp://guest:guest@127.0.0.1:<port>/``."""
        return f"{scheme}://{userinfo}@{self.host}:{self.port}{path}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True,
                                                  ssl=self.ssl)

    async def disconnect(self) -> None:
        """Drop every client connection at once and refuse new ones until ``restore()``."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links)
        for link in links:
            link.abort()
        tasks = [task for link in links for task in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._links.difference_update(links)
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        """Accept connections again, on the same port (after ``disconnect()`` or ``blackhole()``)."""
        silent = [link for link in self._links if link.silent]
        for link in silent:                       # their byte streams have holes: drop them
            link.abort()
        tasks = [task for link in silent for task in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._links.difference_update(silent)
        await self.start()

    async def blackhole(self) -> None:
        """Keep every connection open but let no byte through either way, and accept no new ones
        (what a cut network cable looks like to both ends, until their heartbeats notice)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()                        # (no wait_closed(): on 3.12+ it waits for the
                                                  # connections, which stay open here)
        for link in self._links:
            link.silent = True

    async def stop(self) -> None:
        await self.disconnect()

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """The broker is unreachable through this proxy inside the block."""
        await self.disconnect()
        try:
            yield
        finally:
            await self.restore()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:                  # raced with disconnect()
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._links.discard(link)
            writer.transport.abort()
            return
        link.upstream = up_writer
        if link not in self._links:               # disconnected while connecting upstream
            link.abort()
            return
        link.tasks = [asyncio.create_task(self._pump(reader, up_writer, link)),
                      asyncio.create_task(self._pump(up_reader, writer, link))]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if link.silent:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl_module.SSLError):
            pass
        finally:
            if not link.silent or link not in self._links:
                link.abort()                      # one side gone: the whole link goes
                self._links.discard(link)
            # blackholed: the other end must not learn that this one went away
