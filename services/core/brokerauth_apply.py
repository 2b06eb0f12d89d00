"""Putting the broker policy (``brokerauth``) onto the brokers.

* RabbitMQ: ``apply_rabbitmq`` runs the ``rabbitmqctl`` operations, idempotently: an existing user
  gets ``change_password`` instead of ``add_user``, permissions already in place are not set again,
  and what the broker holds afterwards is read back and compared (a wrapper that re-parses arguments
  through a shell, as Debian's does when run as root, would otherwise go unnoticed).
* NATS: ``write_nats_config`` writes the config file atomically with mode 0600; ``reload_nats_server``
  makes a running server read it again (SIGHUP).

Passwords never reach a command line, a log line or an exception: ``rabbitmqctl add_user`` and
``change_password`` read them from standard input, every password is registered with the log
redaction before anything runs, and ``rabbitmqctl``'s output is scrubbed of them before it is quoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from services.core.brokerauth import (
    MANAGED_TAG,
    AddUser,
    NatsTls,
    PasswordHasher,
    Policy,
    RabbitOp,
    SetPermissions,
    SetTopicPermissions,
    SetUserTags,
    render_nats_config,
)
from services.core.files import write_private
from services.core.logging import redact_text, register_secret
from services.core.secrets import SecretStore, generate_password

__all__ = [
    "BrokerAuthError",
    "RabbitApplyReport",
    "RabbitCtl",
    "apply_nats",
    "apply_rabbitmq",
    "bcrypt_hasher",
    "delete_rabbitmq_users",
    "ensure_broker_passwords",
    "prune_rabbitmq_users",
    "reload_nats_server",
    "write_nats_config",
]

log = structlog.get_logger("roost.brokerauth")


class BrokerAuthError(Exception):
    """The policy could not be applied.  The message never holds a password."""


# -- RabbitMQ ------------------------------------------------------------------------------------


@dataclass
class RabbitCtl:
    """Runs ``rabbitmqctl`` (as the machine's admin: root or the rabbitmq user)."""

    executable: str = "rabbitmqctl"
    node: str | None = None
    timeout: float = 60.0
    _secrets: set[str] = field(default_factory=set, repr=False)

    def add_secret(self, secret: str) -> None:
        """Scrub ``secret`` from every output quoted in an error from now on."""
        if secret:
            self._secrets.add(secret)

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return redact_text(text)

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        """Run one command; its standard output.  ``BrokerAuthError`` on failure, with its scrubbed output."""
        cmd = [self.executable, *(["-n", self.node] if self.node else []), *args]
        what = f"rabbitmqctl {args[0]}" if args else "rabbitmqctl"
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise BrokerAuthError(f"{self.executable} not found: run this on the RabbitMQ machine, or pass "
                                  "the path of rabbitmqctl") from None
        except OSError as exc:
            raise BrokerAuthError(f"cannot run {self.executable}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise BrokerAuthError(f"{what} did not finish within {self.timeout:g}s") from None
        if proc.returncode != 0:
            detail = (err.decode("utf-8", "replace").strip() or out.decode("utf-8", "replace").strip())
            lines = [ln for ln in detail.splitlines() if ln.strip()][-3:]
            raise BrokerAuthError(f"{what} failed (exit {proc.returncode}): {self._scrub(' | '.join(lines))}")
        return out.decode("utf-8", "replace")

    async def _json(self, *args: str) -> list[dict[str, Any]]:
        text = await self.run(*args, "--formatter", "json", "-q")
        try:
            rows = json.loads(text) if text.strip() else []
        except ValueError:
            raise BrokerAuthError(f"rabbitmqctl {args[0]} printed something that is not JSON") from None
        if not isinstance(rows, list):
            raise BrokerAuthError(f"rabbitmqctl {args[0]} printed {type(rows).__name__}, not a list")
        return [r for r in rows if isinstance(r, dict)]

    async def users(self) -> dict[str, tuple[str, ...]]:
        """Every user and its tags."""
        return {str(r["user"]): tuple(str(t) for t in (r.get("tags") or [])) for r in await self._json("list_users")}

    async def permissions(self, vhost: str) -> dict[str, tuple[str, str, str]]:
        """``user -> (configure, write, read)`` in ``vhost``."""
        return {str(r["user"]): (str(r["configure"]), str(r["write"]), str(r["read"]))
                for r in await self._json("list_permissions", "-p", vhost)}

    async def topic_permissions(self, vhost: str) -> dict[tuple[str, str], tuple[str, str]]:
        """``(user, exchange) -> (write, read)`` in ``vhost``."""
        return {(str(r["user"]), str(r["exchange"])): (str(r["write"]), str(r["read"]))
                for r in await self._json("list_topic_permissions", "-p", vhost)}


@dataclass
class RabbitApplyReport:
    created: list[str] = field(default_factory=list)            # users added
    password_set: list[str] = field(default_factory=list)       # existing users whose password was set
    changed: list[str] = field(default_factory=list)            # "user: what" for each permission set
    unchanged: int = 0                                          # operations skipped: already in place


async def apply_rabbitmq(ops: Sequence[RabbitOp], ctl: RabbitCtl | None = None) -> RabbitApplyReport:
    """Run ``ops`` (from ``brokerauth.rabbitmq_operations``) in their order, skipping what is in place,
    then read back what the broker holds and raise ``BrokerAuthError`` if it differs."""
    ctl = ctl or RabbitCtl()
    for op in ops:
        if isinstance(op, AddUser):
            register_secret(op.password)
            ctl.add_secret(op.password.get_secret_value())
    report = RabbitApplyReport()
    users = await ctl.users()
    vhosts = sorted({op.vhost for op in ops if isinstance(op, SetPermissions | SetTopicPermissions)})
    perms = {v: await ctl.permissions(v) for v in vhosts}
    topics = {v: await ctl.topic_permissions(v) for v in vhosts}
    for op in ops:
        if isinstance(op, AddUser):
            exists = op.user in users
            await ctl.run(*op.args(exists=exists), stdin=op.stdin())
            (report.password_set if exists else report.created).append(op.user)
            users.setdefault(op.user, ())
            log.info("rabbitmq user password set" if exists else "rabbitmq user created", user=op.user)
        elif isinstance(op, SetUserTags):
            if sorted(users.get(op.user, ())) == sorted(op.tags):
                report.unchanged += 1
                continue
            await ctl.run(*op.args())
            report.changed.append(f"{op.user}: tags")
        elif isinstance(op, SetTopicPermissions):
            if topics[op.vhost].get((op.user, op.exchange)) == (op.write, op.read):
                report.unchanged += 1
                continue
            await ctl.run(*op.args())
            report.changed.append(f"{op.user}: topic permissions on {op.exchange}")
            log.info("rabbitmq topic permissions set", user=op.user, vhost=op.vhost, exchange=op.exchange,
                     write=op.write, read=op.read)
        else:
            if perms[op.vhost].get(op.user) == (op.configure, op.write, op.read):
                report.unchanged += 1
                continue
            await ctl.run(*op.args())
            report.changed.append(f"{op.user}: permissions in {op.vhost}")
            log.info("rabbitmq permissions set", user=op.user, vhost=op.vhost, configure=op.configure,
                     write=op.write, read=op.read)
    await verify_rabbitmq(ops, ctl)
    return report


async def verify_rabbitmq(ops: Sequence[RabbitOp], ctl: RabbitCtl) -> None:
    """``BrokerAuthError`` naming every user whose permissions on the broker differ from ``ops``."""
    vhosts = sorted({op.vhost for op in ops if isinstance(op, SetPermissions | SetTopicPermissions)})
    perms = {v: await ctl.permissions(v) for v in vhosts}
    topics = {v: await ctl.topic_permissions(v) for v in vhosts}
    users = await ctl.users()
    wrong: list[str] = []
    for op in ops:
        if isinstance(op, AddUser) and op.user not in users:
            wrong.append(f"{op.user} does not exist")
        elif isinstance(op, SetUserTags) and sorted(users.get(op.user, ())) != sorted(op.tags):
            wrong.append(f"{op.user} has tags {list(users.get(op.user, ()))}, not {list(op.tags)}")
        elif isinstance(op, SetTopicPermissions) and \
                topics[op.vhost].get((op.user, op.exchange)) != (op.write, op.read):
            wrong.append(f"{op.user}'s topic permissions on {op.exchange} are "
                         f"{topics[op.vhost].get((op.user, op.exchange))}, not {(op.write, op.read)}")
        elif isinstance(op, SetPermissions) and perms[op.vhost].get(op.user) != (op.configure, op.write, op.read):
            wrong.append(f"{op.user}'s permissions in {op.vhost} are {perms[op.vhost].get(op.user)}, "
                         f"not {(op.configure, op.write, op.read)}")
    if wrong:
        raise BrokerAuthError("RabbitMQ does not hold the permissions that were set (is rabbitmqctl a "
                              "wrapper that re-parses its arguments?): " + "; ".join(wrong))


async def delete_rabbitmq_users(names: Iterable[str], ctl: RabbitCtl | None = None) -> list[str]:
    """Delete those of ``names`` that exist; the ones deleted."""
    ctl = ctl or RabbitCtl()
    existing = await ctl.users()
    deleted = []
    for name in names:
        if name in existing:
            await ctl.run("delete_user", name)
            deleted.append(name)
            log.info("rabbitmq user deleted", user=name)
    return deleted


async def prune_rabbitmq_users(policy: Policy, ctl: RabbitCtl | None = None) -> list[str]:
    """Delete the users this policy once created (tagged ``roost``) that it no longer lists."""
    ctl = ctl or RabbitCtl()
    keep = set(policy.names)
    stale = [u for u, tags in (await ctl.users()).items() if MANAGED_TAG in tags and u not in keep]
    return await delete_rabbitmq_users(stale, ctl)


# -- NATS ----------------------------------------------------------------------------------------


def write_nats_config(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all, readable by its owner only (0600)."""
    target = write_private(path, text)
    log.info("nats config written", path=str(target))
    return target


def reload_nats_server(pid: int) -> None:
    """Make the nats-server with ``pid`` read its config file again (users and permissions included)."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BrokerAuthError(f"no nats-server with pid {pid}") from None


def apply_nats(policy: Policy, passwords: Mapping[str, SecretStr | str], path: Path | str, *,
               server_pid: int | None = None, server_name: str | None = None,
               hash_passwords: bool = True, hasher: PasswordHasher | None = None, tls: NatsTls | None = None,
               private_inboxes: bool = True) -> Path:
    """Render the policy's nats-server config, write it (0600) and, given a pid, reload that server.

    Passwords are written as bcrypt hashes when this Python can make them (``bcrypt_hasher``), else in
    clear (the file stays readable by its owner only); ``hash_passwords=False`` always writes them in
    clear (a client then authenticates without the server spending a bcrypt per connection).
    A server started with ``-n <name>`` (``NatsServer``) reloads only a config naming the same
    ``server_name``; a refused reload is written to the server's log only (a signal has no answer)."""
    for value in passwords.values():
        register_secret(value)
    if hasher is None and hash_passwords:
        hasher = bcrypt_hasher()
        if hasher is None:
            log.info("nats passwords written in clear to a 0600 file: no bcrypt in this Python", path=str(path))
    text = render_nats_config(policy, passwords, hasher=hasher, tls=tls, server_name=server_name,
                              private_inboxes=private_inboxes)
    written = write_nats_config(path, text)
    if server_pid is not None:
        reload_nats_server(server_pid)
    return written


def bcrypt_hasher(cost: int = 11) -> PasswordHasher | None:
    """A bcrypt function for ``render_nats_config(hasher=...)``, or None when this Python has none.

    Uses the ``bcrypt`` package when installed, else the C library's ``crypt`` through the standard
    library (Python 3.11 and 3.12 with libxcrypt, as on Debian); without either, NATS gets passwords.
    """
    if not 4 <= cost <= 31:
        raise ValueError("bcrypt cost must be between 4 and 31")
    try:
        lib: Any = importlib.import_module("bcrypt")
    except ImportError:
        lib = None
    if lib is not None:
        def with_bcrypt(password: str) -> str:
            return str(lib.hashpw(password.encode(), lib.gensalt(rounds=cost)).decode())
        return with_bcrypt
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            crypt: Any = importlib.import_module("crypt")
    except ImportError:
        return None
    method = getattr(crypt, "METHOD_BLOWFISH", None)
    if method is None:
        return None

    def with_crypt(password: str) -> str:
        result = crypt.crypt(password, crypt.mksalt(method, rounds=1 << cost))
        if not isinstance(result, str) or not result.startswith("$2"):
            raise BrokerAuthError("the C library's crypt() does not do bcrypt here")
        return result

    try:
        with_crypt("probe-password")
    except (BrokerAuthError, OSError, ValueError):
        return None
    return with_crypt


# -- credentials ---------------------------------------------------------------------------------


def broker_password_secret(user: str) -> str:
    """The name of ``user``'s broker password in the secret store."""
    return f"broker-password-{user}"


def ensure_broker_passwords(store: SecretStore, policy: Policy) -> dict[str, SecretStr]:
    """Every principal's broker password from the secret store, generated (and kept) on first use."""
    return {name: store.ensure_text(broker_password_secret(name), generate_password) for name in policy.names}
