"""The dispatcher's lean HTTP/1.1 client against real servers on loopback (raw asyncio, TLS included)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.alarms.webhooks.http import HttpClient, HttpProtocolError, parse_target

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


class Server:
    def __init__(self, answers: list[bytes], *, close_after: int | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.answers = answers
        self.close_after = close_after
        self.tls = tls
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                self.requests.append(await read_request(reader))
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                writer.write(answer)
                await writer.drain()
                served += 1
                if answer.startswith(b"HTTP/1.0") or (self.close_after is not None and served >= self.close_after):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_posts_reuse_one_keep_alive_connection() -> None:
    async with Server([OK]) as server:
        client = HttpClient(max_connections=2)
        for i in range(3):
            answer = await client.post(f"http://user:p%40ss@127.0.0.1:{server.port}/hook?x=1", b"{}%d" % i,
                                       {"webhook-id": "msg_1", "content-type": "application/json"})
            assert answer.status == 200
        await client.aclose()
    assert server.connections == 1
    line, headers, body = server.requests[2]
    assert line == "POST /hook?x=1 HTTP/1.1" and body == b"{}2"
    assert headers["host"] == f"127.0.0.1:{server.port}" and headers["webhook-id"] == "msg_1"
    assert headers["authorization"] == "Basic dXNlcjpwQHNz"          # user:p@ss


async def test_chunked_close_and_retry_after_answers() -> None:
    answers = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
               b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.0 200 OK\r\n\r\nuntil the end"]
    async with Server(answers) as server:
        client = HttpClient()
        first = await client.post(f"http://127.0.0.1:{server.port}/", b"a", {})
        assert (first.status, first.headers["retry-after"]) == (429, "7")
        assert (await client.post(f"http://127.0.0.1:{server.port}/", b"b", {})).status == 503
        assert server.connections == 1
        answer = await asyncio.wait_for(client.post(f"http://127.0.0.1:{server.port}/", b"c", {}), 5)
        assert answer.status == 200 and server.connections == 2     # Connection: close was honoured
        await client.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced_once() -> None:
    async with Server([OK], close_after=1) as server:
        client = HttpClient()
        assert (await client.post(f"http://127.0.0.1:{server.port}/", b"a", {})).status == 200
        await asyncio.sleep(0.05)                        # the server has closed it meanwhile
        assert (await client.post(f"http://127.0.0.1:{server.port}/", b"b", {})).status == 200
        await client.aclose()
    assert server.connections == 2 and len(server.requests) == 2


async def test_garbage_and_refused_and_a_hang_are_errors() -> None:
    async with Server([b"SMTP ready\r\n\r\n"]) as server:
        client = HttpClient()
        with pytest.raises(HttpProtocolError):
            await client.post(f"http://127.0.0.1:{server.port}/", b"a", {})
        port = server.port
    with pytest.raises(OSError):
        await client.post(f"http://127.0.0.1:{port}/", b"a", {})

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)
    hanging = await asyncio.start_server(hang, "127.0.0.1", 0)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.post(f"http://127.0.0.1:{hanging.sockets[0].getsockname()[1]}/", b"a", {})
    finally:
        hanging.close()
    with pytest.raises(ValueError):
        parse_target("ftp://example.com/")


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    yield cert_path, key_path


async def test_https_is_verified(certificate: tuple[Path, Path]) -> None:
    cert_path, key_path = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_path, key_path)
    async with Server([OK], tls=server_tls) as server:
        untrusting = HttpClient()                        # certifi's CAs: a self-signed certificate is refused
        with pytest.raises(ssl.SSLError):
            await untrusting.post(f"https://127.0.0.1:{server.port}/", b"a", {})
        await untrusting.aclose()
        trusting = HttpClient(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
        answer = await trusting.post(f"https://localhost:{server.port}/hook", b"a", {})
        assert answer.status == 200 and server.requests[-1][0] == "POST /hook HTTP/1.1"
        await trusting.aclose()
