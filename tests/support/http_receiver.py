"""A real HTTP/1.1 server on loopback for webhook tests (raw asyncio; no client is mocked).

``HttpReceiver(handler)`` records every request (method, path, lower-cased headers, body, arrival time
on the loop clock) *before* calling ``handler(request)``, which returns a ``Reply`` or never returns (a
hanging receiver: ``await hang()``).  ``stop()`` closes the listening socket and every connection, so a
``start()`` afterwards on the same port is "the receiver came back".  ``wait_for(predicate)`` waits for
a condition on the recorded requests (woken by each request, bounded by a timeout).  ``open_requests``
counts, per path, requests received, not answered yet and whose client is still connected (and
``max_open`` the most seen at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    raw: bytes | None = None    # written as is instead of a response, then the connection is closed


Handler = Callable[[Request], Awaitable[Reply]]


async def ok(_: Request) -> Reply:
    return Reply()


async def hang() -> Reply:
    """Never answer (until the connection is torn down)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class HttpReceiver:
    def __init__(self, handler: Handler = ok, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.requests: list[Request] = []
        self.open_requests: Counter[str] = Counter()
        self.max_open: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Condition()

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def start(self) -> HttpReceiver:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> HttpReceiver:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def on(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(predicate)
            except TimeoutError:
                raise AssertionError(f"not true after {timeout}s: {what or predicate}; "
                                     f"{len(self.requests)} request(s) received") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, path, headers, body, asyncio.get_running_loop().time())
                self.requests.append(request)
                self.open_requests[path] += 1
                self.max_open[path] = max(self.max_open[path], self.open_requests[path])
                await self._notify()
                # While the handler works, watch the connection: a client that gives up (timeout, killed)
                # closes it, and the request no longer counts as open.
                answer = asyncio.ensure_future(self.handler(request))
                gone = asyncio.ensure_future(reader.read(1))
                try:
                    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self.open_requests[path] -= 1
                    for pending in (answer, gone):
                        if not pending.done():
                            pending.cancel()
                    await asyncio.gather(answer, gone, return_exceptions=True)
                if not answer.done() or answer.cancelled() or (gone.done() and not gone.cancelled()):
                    return
                reply = answer.result()
                reason = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else "X"
                extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
                if reply.raw is not None:
                    writer.write(reply.raw)
                    await writer.drain()
                    return
                if reply.status in (204, 304):  # no body, no length
                    writer.write(f"HTTP/1.1 {reply.status} {reason}\r\n{extra}\r\n".encode("latin-1"))
                else:
                    writer.write(f"HTTP/1.1 {reply.status} {reason}\r\nContent-Length: {len(reply.body)}\r\n"
                                 f"Content-Type: text/plain\r\n{extra}\r\n".encode("latin-1") + reply.body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # stop(): this connection is torn down (asyncio's stream callback reports a cancelled task)
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
