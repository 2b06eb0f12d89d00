"""The real sushy-tools Redfish emulator (``sushy-emulator --fake``) as a subprocess, for BMC tests.

``running_sushy(directory, systems, credentials=...)`` writes ``emulator.conf`` (the fake driver's
systems, a state directory of its own: the fake driver keeps its systems in a SQLite file there that
would otherwise survive into the next run, and optionally an htpasswd file with a bcrypt entry so that
wrong credentials are refused), starts ``sushy-emulator --config … --fake -i 127.0.0.1 -p <free port>``,
waits until ``GET /redfish/v1/`` answers (polling against a deadline; the emulator's log is shown if it
dies or never answers) and stops it at the end; ``tls=True`` serves HTTPS with a self-signed
certificate.  ``RewritingProxy`` sits in front of it to play a BMC that differs (fewer reset types, an
ActionInfo, no boot override).  sushy-tools is a test dependency: when it is missing
the test fails saying so, it never skips.

What the fake driver does (sushy-tools 2.2.0): power changes land 1 to 11 seconds after the reset is
accepted (``*Restart`` shows ``Off`` at once, ``On`` later); ``PowerCycle`` and ``Nmi`` answer 501; the
systems collection lists UUIDs and ``/Systems/<name>`` redirects (307) to the UUID; NIC ids are MACs;
no CPU count, no memory size, no processors; ``Storage`` only for the systems given ``drives``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class FakeSystem:
    """One system of the fake driver."""

    uuid: str
    name: str
    power_state: str = "On"                    # "On" or "Off"
    macs: tuple[str, ...] = ()
    drives: tuple[tuple[str, int], ...] = ()   # (drive id, capacity in bytes), in one storage "1"

    def config(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "power_state": self.power_state, "external_notifier": False,
                "nics": [{"mac": mac, "ip": f"10.0.0.{i + 10}"} for i, mac in enumerate(self.macs)]}


@dataclass
class SushyEmulator:
    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    systems: tuple[FakeSystem, ...]
    username: str = "admin"
    password: str = ""
    log_path: Path = field(default_factory=Path)
    certificate: Path | None = None            # the self-signed certificate when it serves HTTPS

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, path: str) -> dict[str, Any]:
        """GET a Redfish resource directly (not through the code under test), following redirects."""
        request = urllib.request.Request(self.url + path)
        if self.password:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.certificate)) if self.certificate else None
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result


def emulator_command() -> str:
    """The ``sushy-emulator`` next to this Python (the virtualenv's), or on PATH; fail loudly otherwise."""
    beside = Path(sys.executable).parent / "sushy-emulator"
    if beside.exists():
        return str(beside)
    found = shutil.which("sushy-emulator")
    if found is None:
        pytest.fail("sushy-emulator is not installed: it is a test dependency (pip install -e '.[test]', which "
                    "brings sushy-tools==2.2.0)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``host``: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bmc {host}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "bmc-cert.pem", directory / "bmc-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _config(directory: Path, systems: Sequence[FakeSystem], auth_file: Path | None,
            tls: tuple[Path, Path] | None = None) -> str:
    storage: dict[str, list[dict[str, Any]]] = {}
    drives: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for system in systems:
        if system.drives:
            storage[system.uuid] = [{"Id": "1", "Name": "Local Storage Controller",
                                     "StorageControllers": [{"MemberId": "0", "Name": "Contoso Integrated RAID",
                                                             "SpeedGbps": 12}],
                                     "Drives": [d for d, _ in system.drives]}]
            drives[(system.uuid, "1")] = [{"Id": d, "Name": d, "CapacityBytes": size, "Protocol": "SAS"}
                                          for d, size in system.drives]
    lines = [
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        f"SUSHY_EMULATOR_STATE_DIR = {str(directory / 'state')!r}",
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {[s.config() for s in systems]!r}",
        f"SUSHY_EMULATOR_STORAGE = {storage!r}",
        f"SUSHY_EMULATOR_DRIVES = {drives!r}",
    ]
    if auth_file is not None:
        lines.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}")
    if tls is not None:
        lines += [f"SUSHY_EMULATOR_SSL_CERT = {str(tls[0])!r}", f"SUSHY_EMULATOR_SSL_KEY = {str(tls[1])!r}"]
    return "\n".join(lines) + "\n"


def _answers(url: str, cafile: Path | None = None) -> bool:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(url + "/redfish/v1/", timeout=1, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def running_sushy(directory: Path, systems: Sequence[FakeSystem], *,
                  credentials: tuple[str, str] | None = None, tls: bool = False, ready_timeout: float = 30.0,
                  extra_env: Mapping[str, str] | None = None) -> Iterator[SushyEmulator]:
    """Run the emulator with ``systems`` (and basic auth for ``credentials``; HTTPS with a self-signed
    certificate, ``SushyEmulator.certificate``, for ``tls``) until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    auth_file = None
    if credentials is not None:
        user, password = credentials
        auth_file = directory / "htpasswd"
        # rounds=4: the emulator checks the hash on every request
        digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        auth_file.write_text(f"{user}:{digest}\n")
    config = directory / "emulator.conf"
    certificate = self_signed_certificate(directory) if tls else None
    config.write_text(_config(directory, systems, auth_file, certificate))
    scheme = "https" if tls else "http"
    cafile = certificate[0] if certificate else None
    env = {**os.environ, **(extra_env or {})}
    env.pop("SUSHY_EMULATOR_CONFIG", None)
    command = emulator_command()
    last_log = ""
    for attempt in range(3):                 # the free port may be taken between choosing and binding
        port = free_port()
        log_path = directory / f"emulator-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen([command, "--config", str(config), "--fake", "-i", "127.0.0.1", "-p", str(port)],
                                       stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=directory)
        url = f"{scheme}://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while process.poll() is None and not _answers(url, cafile) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None and _answers(url, cafile):
            emulator = SushyEmulator(url=url, process=process, directory=directory, systems=tuple(systems),
                                     username=credentials[0] if credentials else "admin",
                                     password=credentials[1] if credentials else "", log_path=log_path,
                                     certificate=cafile)
            try:
                yield emulator
            finally:
                _stop(process)
            return
        _stop(process)
        last_log = log_path.read_text(errors="replace")
        if "Address already in use" not in last_log:
            break
    pytest.fail(f"sushy-emulator did not answer GET /redfish/v1/ within {ready_timeout}s; its log:\n{last_log[-3000:]}",
                pytrace=False)


Rewrite = Callable[[str, dict[str, Any]], dict[str, Any] | None]


class RewritingProxy:
    """A BMC that differs from sushy's: an HTTP proxy in front of the emulator that passes every request
    on and lets ``rewrite(path, document)`` change (or, returning None, leave) each JSON document a GET
    answers; ``extra`` serves documents sushy does not have (e.g. an ActionInfo); ``requests`` records
    every (method, path, body) passed on.  For what the fake driver cannot be configured to do: advertise
    fewer reset types, have no boot override, ignore a graceful shutdown."""

    def __init__(self, upstream: str, rewrite: Rewrite, extra: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.upstream = upstream
        self.rewrite = rewrite
        self.extra = dict(extra or {})
        self.requests: list[tuple[str, str, bytes]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if self.command == "GET" and self.path in proxy.extra:
                    self._answer(200, json.dumps(proxy.extra[self.path]).encode(), "application/json")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path, body or b""))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status, data = response.status, response.read()
                        kind = response.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as error:
                    status, data = error.code, error.read()
                    kind = error.headers.get("Content-Type", "application/json")
                if self.command == "GET" and status == 200 and data:
                    changed = proxy.rewrite(self.path, json.loads(data))
                    if changed is not None:
                        data = json.dumps(changed).encode()
                self._answer(status, data, kind)

            def _answer(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="redfish-proxy", daemon=True)

    def __enter__(self) -> RewritingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
