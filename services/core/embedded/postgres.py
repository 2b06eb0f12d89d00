"""An embedded PostgreSQL server for ``roost up`` when no ``ROOST_DATABASE_URL`` is configured.

``EmbeddedPostgres(data_dir)`` runs the PostgreSQL 16 binaries that the ``pgserver`` wheel bundles
(``<site-packages>/pgserver/pginstall/bin``), so a machine needs nothing but our package.  It does not
use pgserver's Python API: that API ``useradd``s a login user with a shell, makes every ancestor of the
data directory and of the venv world-readable, keeps a reference count of client pids inside the
data directory (a SIGKILLed client is never forgotten, so the server is never stopped), and takes a
stale ``postmaster.pid`` whose pid was reused by another process for a running server.  Instead this
module drives ``initdb`` and ``pg_ctl`` itself.

Layout of ``data_dir``, a directory dedicated to this server (created if missing; as root it is chowned
to the server's user; all of it survives a restart of roost)::

    data_dir/                 0700, owned by the user the server runs as
      pgdata/                 the cluster (initdb runs in pgdata.initdb/ and is renamed when complete)
      pgdata/roost.conf       settings rewritten at every start (included from postgresql.conf)
      postgresql.log          the server's log (pg_ctl -l); not rotated, PostgreSQL logs little by default
      embedded.lock           flock held while starting or stopping, across processes
      .s.PGSQL.5432           the Unix socket, when the path fits in sun_path (107 bytes); otherwise
                              the socket lives in /tmp/roost-pg-<hash of data_dir>/ (0700, owner checked)

Users.  PostgreSQL refuses to run as root.  When roost runs as root, the server runs as the system
user ``roost-pg`` (created with ``useradd --system``, no home, ``nologin`` shell, when missing),
``data_dir`` is chowned to it, and any ancestor directory of ``data_dir`` or of the bundled binaries
that this user cannot traverse gets the single search (x) bit it lacks (for example ``/root`` → 0701);
each such change is logged.  As any other user the server runs as that user.

Network and authentication.  The server listens on its Unix socket only (``listen_addresses = ''``).
Connections on the socket are ``trust``: whoever can open the socket is the superuser ``postgres``.
That is acceptable for a single-machine embedded server because the socket's directory is 0700 and
owned by the server's user, and ``unix_socket_permissions = 0700``: only that user and root can
connect.  TCP would need passwords (``pg_hba`` says ``scram-sha-256`` for host lines and no password is
set), so it is not offered; point ``ROOST_DATABASE_URL`` at a real server for that.

Durability: ``fsync``, ``full_page_writes`` and ``synchronous_commit`` are on, data checksums are on.

Lifecycle.  ``start()`` reuses a server already running on the same data directory (started by an
earlier roost that died, or by another instance); it recovers from a stale ``postmaster.pid`` left by a
SIGKILL (it waits for the killed server's children to leave its shared memory, and removes the file
when its pid is dead, a zombie, or now belongs to an unrelated process).  ``stop()`` stops the data
directory's server whoever started it (fast shutdown, waits; immediate shutdown if that times out).
Failures raise ``EmbeddedPostgresError`` with one readable line naming the cause and the log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import structlog

from services.core.files import fsync_dir

log = structlog.get_logger("roost.embedded.postgres")

__all__ = ["DEFAULT_DATABASE", "DEFAULT_SYSTEM_USER", "SUPERUSER", "EmbeddedPostgres", "EmbeddedPostgresError"]

DEFAULT_SYSTEM_USER = "roost-pg"
DEFAULT_DATABASE = "roost"
SUPERUSER = "postgres"

_PORT = 5432  # only names the socket file: the server listens on no TCP port
_SOCKET_NAME = f".s.PGSQL.{_PORT}"
_MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SHORT_TMP = Path("/tmp")  # noqa: S108 - a short path for the socket; the directory in it is private and checked
_POLL = 0.05  # seconds between two looks at a condition we wait for
_UNSAFE_PATH_CHARS = frozenset("\"'\\$`,")  # break pg_ctl's shell command or PostgreSQL's config lists
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_Condition = Callable[[], bool]
_LOG_PREFIX = re.compile(r"^.*?\b(?=(?:FATAL|PANIC|ERROR|LOG|DETAIL|HINT|WARNING):)")


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL cannot be prepared, started or stopped.  ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True, slots=True)
class _Account:
    """The operating-system user the server's programs run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool  # True: we are root and must switch to this user for initdb / pg_ctl / postgres


@dataclass(frozen=True, slots=True)
class _PidFile:
    """What ``postmaster.pid`` says.  ``pid`` is None when the file is unreadable (bogus)."""

    pid: int | None
    port: int | None
    socket_dir: str | None
    shm_id: int | None
    status: str


class EmbeddedPostgres:
    """A real PostgreSQL server whose data lives under ``data_dir``.

    ``url = await pg.start()`` returns an asyncpg DSN for the ``roost`` database (created if missing);
    ``await pg.stop()`` stops the server.  Also an async context manager.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        database: str = DEFAULT_DATABASE,
        system_user: str = DEFAULT_SYSTEM_USER,
        bin_dir: Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.data_dir: Path = Path(data_dir).expanduser().resolve()
        self.pgdata: Path = self.data_dir / "pgdata"
        self.log_file: Path = self.data_dir / "postgresql.log"
        self.database = database
        self.system_user = system_user
        self._bin_dir = bin_dir
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._lock_file = self.data_dir / "embedded.lock"
        self._guard = asyncio.Lock()
        self._url: str | None = None
        self._pid: int | None = None
        self.reused = False  # the last start() found the server already running

    # -- public API ---------------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The DSN of the ``roost`` database after ``start()``, else None."""
        return self._url

    @property
    def pid(self) -> int | None:
        """The postmaster's pid after ``start()``, else None."""
        return self._pid

    async def start(self) -> str:
        """Start the server (or reuse the one running on this data directory); return the DSN."""
        _check_path(self.data_dir)
        async with self._guard, self._locked():
            account = await asyncio.to_thread(self._prepare)
            bin_dir = self._binaries()
            major = await self._server_major(account, bin_dir)
            if not (self.pgdata / "PG_VERSION").exists():
                await self._initdb(account, bin_dir)
            await asyncio.to_thread(self._check_cluster_version, major)
            socket_dir, port = await self._reuse_or_launch(account, bin_dir)
            await self._ensure_database(self._dsn(socket_dir, port, "postgres"))
            self._url = self._dsn(socket_dir, port, self.database)
        log.info(
            "embedded postgres ready",
            data_dir=str(self.data_dir),
            pid=self._pid,
            reused=self.reused,
            socket_dir=socket_dir,
            user=account.name,
        )
        return self._url

    async def stop(self) -> None:
        """Stop the server running on this data directory (fast shutdown) and wait until it is gone.

        A no-op when none runs.  It stops the server even when another instance or process started it.
        """
        if not self.data_dir.is_dir():
            return
        async with self._guard, self._locked():
            info = _read_pidfile(self.pgdata / "postmaster.pid")
            if info is None or info.pid is None or not _is_postmaster_of(info.pid, self.pgdata):
                self._forget()
                return
            account = await asyncio.to_thread(self._owner_account)
            bin_dir = self._binaries()
            pg_ctl = str(bin_dir / "pg_ctl")
            timeout = max(1, round(self._stop_timeout))
            common = ["-D", str(self.pgdata), "-w", "-s", "-t", str(timeout)]
            rc, out = await self._run(account, [pg_ctl, "stop", "-m", "fast", *common], self._stop_timeout + 10)
            if rc != 0 and _is_postmaster_of(info.pid, self.pgdata):
                log.warning("fast shutdown failed, shutting down immediately", data_dir=str(self.data_dir), output=out)
                rc, out = await self._run(
                    account, [pg_ctl, "stop", "-m", "immediate", *common], self._stop_timeout + 10
                )
            if not await self._wait_until(lambda: not _is_postmaster_of(info.pid or 0, self.pgdata), 10.0):
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL on {self.data_dir} (pid {info.pid}) did not stop: "
                    f"{_telling_line(out) or 'pg_ctl gave no reason'} (log: {self.log_file})"
                )
            log.info("embedded postgres stopped", data_dir=str(self.data_dir), pid=info.pid)
            self._forget()
            if self._socket_dir() != self.data_dir:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._socket_dir().rmdir)  # empty once the server is gone

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- start, step by step ------------------------------------------------------------------------

    def _prepare(self) -> _Account:
        """Blocking: the server's user, its directories and their permissions."""
        try:
            account = _resolve_account(self.system_user)
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if account.switch:
                for path in _grant_search(self.data_dir.parents, account):
                    log.warning("granted search permission so the server's user can reach its data", path=str(path))
                self._take_ownership(account)
            os.chmod(self.data_dir, 0o700)
            if self.pgdata.exists() and not (self.pgdata / "PG_VERSION").exists():
                if any(self.pgdata.iterdir()):
                    raise EmbeddedPostgresError(
                        f"{self.pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION); move it away"
                    )
                self.pgdata.rmdir()
            socket_dir = self._socket_dir()
            if socket_dir != self.data_dir:
                _ensure_private_dir(socket_dir, account)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot prepare the embedded PostgreSQL in {self.data_dir}: {exc}") from exc
        return account

    def _take_ownership(self, account: _Account) -> None:
        """As root: hand ``data_dir`` to the server's user (all of it when the cluster belongs to another)."""
        if self.pgdata.exists() and self.pgdata.stat().st_uid != account.uid:
            log.warning("changing the owner of the embedded data directory", path=str(self.data_dir), user=account.name)
            for top, dirs, files in os.walk(self.data_dir):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(top, name), account.uid, account.gid)
        for path in (self.data_dir, self.log_file):
            if path.exists() and path.stat().st_uid != account.uid:
                os.chown(path, account.uid, account.gid)

    def _owner_account(self) -> _Account:
        """The account that owns the cluster (the one to stop it as)."""
        if os.geteuid() != 0:
            return _resolve_account(self.system_user)
        uid = self.pgdata.stat().st_uid
        try:
            entry = pwd.getpwuid(uid)
        except KeyError as exc:
            raise EmbeddedPostgresError(f"{self.pgdata} belongs to uid {uid}, which has no user entry") from exc
        return _Account(entry.pw_name, uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)), True)

    def _binaries(self) -> Path:
        bin_dir = self._bin_dir or _bundled_bin_dir()
        for name in ("postgres", "initdb", "pg_ctl"):
            if not os.access(bin_dir / name, os.X_OK):
                raise EmbeddedPostgresError(f"PostgreSQL program {bin_dir / name} is missing or not executable")
        return bin_dir

    async def _server_major(self, account: _Account, bin_dir: Path) -> str:
        """Run ``postgres -V`` as the server's user: proves it may execute the binaries."""
        if account.switch:
            install = bin_dir.parent
            tree = [*reversed(install.parents), install, bin_dir, install / "lib", install / "share"]
            changed = await asyncio.to_thread(_grant_search, (d for d in tree if d.is_dir()), account)
            for path in changed:
                log.warning("granted search permission so the server's user can reach the binaries", path=str(path))
        rc, out = await self._run(account, [str(bin_dir / "postgres"), "-V"], 30.0)
        match = _VERSION.search(out)
        if rc != 0 or match is None:
            raise EmbeddedPostgresError(
                f"user {account.name} cannot run {bin_dir / 'postgres'}: {_telling_line(out) or f'exit status {rc}'}"
            )
        return match.group(1)

    def _check_cluster_version(self, major: str) -> None:
        found = (self.pgdata / "PG_VERSION").read_text().strip()
        if found != major:
            raise EmbeddedPostgresError(
                f"{self.pgdata} was created by PostgreSQL {found} but the bundled server is PostgreSQL {major}; "
                "upgrade it with pg_upgrade or point ROOST_DATABASE_URL at a server of that version"
            )

    async def _initdb(self, account: _Account, bin_dir: Path) -> None:
        staging = self.data_dir / "pgdata.initdb"
        await asyncio.to_thread(shutil.rmtree, staging, True)  # left by an initdb that was killed
        args = [
            str(bin_dir / "initdb"),
            "-D",
            str(staging),
            "--username",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--data-checksums",
        ]
        rc, out = await self._run(account, args, self._start_timeout)
        if rc != 0:
            raise EmbeddedPostgresError(f"initdb failed in {staging}: {_telling_line(out) or f'exit status {rc}'}")
        await asyncio.to_thread(self._finish_initdb, staging)
        log.info("embedded postgres cluster created", pgdata=str(self.pgdata))

    def _finish_initdb(self, staging: Path) -> None:
        with (staging / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# roost: settings of the embedded server, rewritten at every start\ninclude = 'roost.conf'\n")
            conf.flush()
            os.fsync(conf.fileno())
        staging.rename(self.pgdata)
        fsync_dir(self.data_dir)

    async def _reuse_or_launch(self, account: _Account, bin_dir: Path) -> tuple[str, int]:
        """Return (socket dir, port) of the running server, starting it when none runs."""
        pidfile = self.pgdata / "postmaster.pid"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while True:
            info = _read_pidfile(pidfile)
            if info is None:
                break
            if info.pid is None or not _is_postmaster_of(info.pid, self.pgdata):
                await self._clear_stale(info, deadline)
                break
            if info.status in ("ready", "standby") and info.socket_dir:
                port = info.port or _PORT
                if await _accepts_connections(self._dsn(info.socket_dir, port, "postgres")):
                    self.reused = True
                    self._pid = info.pid
                    return info.socket_dir, port
            if loop.time() > deadline:
                raise EmbeddedPostgresError(
                    f"a PostgreSQL server (pid {info.pid}, status {info.status or 'unknown'}) runs on {self.pgdata} "
                    f"but accepts no connections (log: {self.log_file})"
                )
            await asyncio.sleep(_POLL)  # it is starting up or shutting down: look again
        await self._launch(account, bin_dir)
        return str(self._socket_dir()), _PORT

    async def _clear_stale(self, info: _PidFile, deadline: float) -> None:
        """The postmaster of ``postmaster.pid`` is gone (killed): clean up after it."""
        if info.shm_id is not None:
            shm_id = info.shm_id
            # Its children leave the shared memory segment as soon as they notice; until then a new
            # postmaster refuses to start ("pre-existing shared memory block is still in use").
            remaining = deadline - asyncio.get_running_loop().time()
            if not await self._wait_until(lambda: not _shm_attached(shm_id), max(remaining, 0.0)):
                raise EmbeddedPostgresError(
                    f"processes of a killed PostgreSQL server still use {self.pgdata} "
                    f"(shared memory id {shm_id}); stop them and start again"
                )
        if info.pid is not None:
            # The killed postmaster may still be exiting (PostgreSQL takes a lock file whose pid exists,
            # even as a zombie, for a running server).  Its pid may also belong to an unrelated postgres
            # process by now, and the shared memory check above already showed it is not ours: so wait
            # briefly, then go on.
            old_pid = info.pid
            await self._wait_until(lambda: not _is_postgres(old_pid), 5.0)
        log.warning("removing a stale postmaster.pid", pgdata=str(self.pgdata), pid=info.pid)
        await asyncio.to_thread(self._remove_stale_files)

    def _remove_stale_files(self) -> None:
        # PostgreSQL removes a lock file whose pid is dead by itself, but not one whose pid is a zombie
        # or was reused by an unrelated process (likely after a container restart): remove them here.
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        socket_dir = self._socket_dir()
        socket_lock = _read_pidfile(socket_dir / f"{_SOCKET_NAME}.lock")
        if socket_lock is not None and (socket_lock.pid is None or not _is_postgres(socket_lock.pid)):
            (socket_dir / f"{_SOCKET_NAME}.lock").unlink(missing_ok=True)
            (socket_dir / _SOCKET_NAME).unlink(missing_ok=True)

    async def _launch(self, account: _Account, bin_dir: Path) -> None:
        socket_dir = self._socket_dir()
        log_offset = await asyncio.to_thread(self._write_settings, account, socket_dir)
        timeout = max(1, round(self._start_timeout))
        args = [
            str(bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-w",
            "-s",
            "-t",
            str(timeout),
        ]
        rc, out = await self._run(account, args, self._start_timeout + 10)
        info = _read_pidfile(self.pgdata / "postmaster.pid")
        if rc != 0 or info is None or info.pid is None or not _is_postmaster_of(info.pid, self.pgdata):
            reason = await asyncio.to_thread(_log_reason, self.log_file, log_offset)
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL on {self.data_dir} did not start: "
                f"{reason or _telling_line(out) or f'pg_ctl exit status {rc}'} (log: {self.log_file})"
            )
        self.reused = False
        self._pid = info.pid

    def _write_settings(self, account: _Account, socket_dir: Path) -> int:
        """Blocking: write ``roost.conf``; return the log's size so that new lines can be found."""
        settings = {
            "listen_addresses": "''",
            "port": str(_PORT),
            "unix_socket_directories": _conf_string(str(socket_dir)),
            "unix_socket_permissions": "0700",
            "fsync": "on",
            "full_page_writes": "on",
            "synchronous_commit": "on",
            "cluster_name": "'roost'",
        }
        text = "# Written by roost at every start of the embedded server: edits here are lost.\n" + "".join(
            f"{key} = {value}\n" for key, value in settings.items()
        )
        conf = self.pgdata / "roost.conf"
        staging = self.pgdata / "roost.conf.new"
        staging.write_text(text, encoding="utf-8")
        os.chmod(staging, 0o600)
        if account.switch:
            os.chown(staging, account.uid, account.gid)
        staging.replace(conf)
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    async def _ensure_database(self, admin_dsn: str) -> None:
        try:
            conn = await asyncpg.connect(admin_dsn, timeout=self._start_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise EmbeddedPostgresError(f"cannot connect to the embedded PostgreSQL ({admin_dsn}): {exc}") from exc
        try:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database) is None:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                    await conn.execute(f"CREATE DATABASE {_quote_ident(self.database)}")
                    log.info("database created", database=self.database)
        except asyncpg.PostgresError as exc:
            raise EmbeddedPostgresError(f"cannot create database {self.database!r}: {exc}") from exc
        finally:
            await conn.close()

    # -- helpers ------------------------------------------------------------------------------------

    def _socket_dir(self) -> Path:
        if len(os.fsencode(self.data_dir / _SOCKET_NAME)) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:16]
        return _SHORT_TMP / f"roost-pg-{digest}"

    def _dsn(self, socket_dir: str, port: int, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={quote(socket_dir, safe='/')}&port={port}"

    def _forget(self) -> None:
        self._url = None
        self._pid = None

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold ``embedded.lock`` (flock) so that processes start and stop this data directory one at a time."""
        try:
            await asyncio.to_thread(self.data_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot use {self.data_dir} for the embedded PostgreSQL: {exc}") from exc
        try:

            def try_lock() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            if not await self._wait_until(try_lock, self._start_timeout + self._stop_timeout):
                raise EmbeddedPostgresError(
                    f"another process keeps {self._lock_file} locked (starting or stopping the embedded PostgreSQL)"
                )
            yield
        finally:
            os.close(fd)  # releases the flock

    @staticmethod
    async def _wait_until(condition: _Condition, timeout: float) -> bool:
        """Poll ``condition`` until it holds (True) or ``timeout`` seconds passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL)
        return True

    def _env(self) -> dict[str, str]:
        # No PG* variables of ours (PGDATA, PGHOST, PGPORT...) may leak into the server's programs.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": str(self.data_dir)}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    async def _run(self, account: _Account, args: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run a PostgreSQL program as ``account``; return (exit status, stdout and stderr).

        In a thread, by ``subprocess``, not by the event loop: ``pg_ctl start`` leaves the server running, and the
        server must inherit none of our descriptors.  uvloop (roost's loop) does not close them in a child, and
        one is a copy of the child's output: the server holding it, the output would never end."""
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=str(self.data_dir),
                user=account.uid if account.switch else None,
                group=account.gid if account.switch else None,
                extra_groups=list(account.groups) if account.switch else None,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} {args[1] if len(args) > 1 else ''} took longer than {timeout:.0f}s "
                f"on {self.data_dir} (log: {self.log_file})"
            ) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {args[0]} as {account.name}: {exc}") from exc
        return done.returncode, done.stdout.decode(errors="replace")


# -- module helpers ---------------------------------------------------------------------------------


def _check_path(path: Path) -> None:
    bad = sorted({c for c in str(path) if c in _UNSAFE_PATH_CHARS or not c.isprintable()})
    if bad:
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL cannot use {str(path)!r}: its path contains {''.join(bad)!r}; choose another"
        )


def _bundled_bin_dir() -> Path:
    """``pgserver``'s bundled binaries, located without importing pgserver (its import has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the pgserver package, which bundles the PostgreSQL binaries, is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _resolve_account(system_user: str) -> _Account:
    """Blocking: the current user, or (as root) ``system_user``, created when missing."""
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return _Account(name, uid, gid, tuple(os.getgroups()), switch=False)
    entry = _ensure_system_user(system_user)
    if entry.pw_uid == 0:
        raise EmbeddedPostgresError(f"user {system_user!r} is root; PostgreSQL refuses to run as root")
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, switch=True)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false")
    try:
        grp.getgrnam(name)
        group_args = ["--gid", name]
    except KeyError:
        group_args = ["--user-group"]
    cmd = [useradd, "--system", *group_args, "--no-create-home", "--home-dir", "/nonexistent", "--shell", shell]
    cmd += ["--comment", "roost embedded PostgreSQL", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        reason = done.stderr.strip() or f"useradd exit status {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    try:
        entry = pwd.getpwnam(name)  # also when a concurrent useradd won the race
    except KeyError:
        raise EmbeddedPostgresError(
            f"cannot create the system user {name!r} that runs PostgreSQL (it refuses to run as root): {reason}"
        ) from None
    log.warning("created a system user for the embedded PostgreSQL", user=name, uid=entry.pw_uid)
    return entry


def _grant_search(paths: Iterable[Path], account: _Account) -> list[Path]:
    """Give ``account`` the search (x) permission it lacks on ``paths``; return the directories changed."""
    changed: list[Path] = []
    for path in paths:
        st = path.stat()
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in account.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            os.chmod(path, stat.S_IMODE(st.st_mode) | bit)
            changed.append(path)
    return changed


def _ensure_private_dir(path: Path, account: _Account) -> None:
    """A 0700 directory owned by ``account`` (for the socket); refuses one planted by somebody else."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise EmbeddedPostgresError(f"socket directory {path} exists and is not a directory")
    if st.st_uid != account.uid:
        if not (account.switch and st.st_uid == 0):
            raise EmbeddedPostgresError(f"socket directory {path} belongs to uid {st.st_uid}, not to {account.name}")
        os.chown(path, account.uid, account.gid)
    os.chmod(path, 0o700)




def _read_pidfile(path: Path) -> _PidFile | None:
    """Parse ``postmaster.pid`` (or a socket lock file): pid, data dir, start time, port, socket dir,
    listen address, shared memory key and id, status.  None when the file does not exist."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    except OSError:
        return _PidFile(None, None, None, None, "")
    lines += [""] * (8 - len(lines))
    first = lines[0].strip()
    pid = int(first) if first.isdigit() and int(first) > 0 else None
    port = int(lines[3]) if lines[3].strip().isdigit() else None
    shm = lines[6].split()
    shm_id = int(shm[1]) if len(shm) == 2 and shm[1].isdigit() else None
    return _PidFile(pid, port, lines[4].strip() or None, shm_id, lines[7].strip())


def _proc_state(pid: int) -> str | None:
    """The process' state letter from /proc (R, S, Z...), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


def _is_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    if Path("/proc/self/stat").exists():
        return _proc_state(pid) not in (None, "Z", "X")
    try:  # no /proc: the best we can do
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    """A live process running a ``postgres`` executable."""
    if not _is_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return True  # no /proc: cannot tell, assume it is


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """``pid`` is a live (not zombie) process whose working directory is ``pgdata``: its postmaster.

    A postmaster changes into its data directory before it writes ``postmaster.pid``.  An unrelated
    process that got the pid of a killed postmaster does not have that working directory.
    """
    if not _is_alive(pid):
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(pgdata)
    except FileNotFoundError:
        return not Path("/proc/self/cwd").exists()  # no /proc: trust the pid
    except PermissionError:
        # Not allowed to look (another user's process; or root without CAP_SYS_PTRACE): it counts as
        # ours when it runs postgres as the data directory's owner.  Never call a live server stale.
        try:
            uid_line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            return _is_postgres(pid) and int(uid_line.split()[1]) == pgdata.stat().st_uid
        except (OSError, StopIteration, ValueError, IndexError):
            return False
    except OSError:
        return False


def _shm_attached(shm_id: int) -> bool:
    """Whether processes are still attached to System V shared memory segment ``shm_id``."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return False  # cannot tell; PostgreSQL will say so if it is in use
    for line in lines[1:]:
        fields = line.split()  # key shmid perms size cpid lpid nattch ...
        if len(fields) > 6 and fields[1] == str(shm_id):
            return fields[6] != "0"
    return False


async def _accepts_connections(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


def _log_reason(log_file: Path, offset: int) -> str:
    """Blocking: the most telling line PostgreSQL logged since ``offset``."""
    try:
        with log_file.open("rb") as f:
            f.seek(offset)
            return _telling_line(f.read().decode(errors="replace"))
    except OSError:
        return ""


def _telling_line(text: str) -> str:
    """The line of PostgreSQL's output that says what went wrong: the last FATAL or PANIC, else the
    first ERROR or ``error:`` (initdb, pg_ctl), else the last line; without its timestamp and pid."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL:" in line or "PANIC:" in line]
    errors = [line for line in lines if "ERROR:" in line or "error:" in line]
    line = fatal[-1] if fatal else errors[0] if errors else lines[-1] if lines else ""
    return _LOG_PREFIX.sub("", line)


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
