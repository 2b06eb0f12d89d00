"""The local secret store: one file per secret under ``<data_dir>/secrets/``.

* the directory is ``0700`` and every file ``0600``, owned by the user running roost;
* a file is written whole or not at all: a temporary file in the same directory (created ``0600``),
  flushed to disk, then renamed into place (``put``) or hard-linked (``ensure``, which must not
  replace a value another process created first), then the directory is synced;
* a file (or the directory) that group or others could read, or that belongs to someone else, is
  refused with an error saying how to fix it: a leaked key must be noticed, not used;
* values are returned as ``SecretBytes`` / ``SecretStr`` (their ``repr`` hides them) and registered
  with the log redaction, so they are masked even if someone logs them by mistake.  The store logs
  names only.

What lives here: the heartbeat HMAC master key, the credentials the services present to the broker
and similar keys.  The bootstrap admin token is not here: only its hash is kept, in PostgreSQL.

This module is named ``secrets`` inside ``services.core``; it imports the standard library's
``secrets`` absolutely, and so should every other module.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets as _random
import stat
from collections.abc import Callable
from pathlib import Path

import structlog
from pydantic import SecretBytes, SecretStr

from services.core.files import fsync_dir
from services.core.logging import register_secret

log = structlog.get_logger("roost.secrets")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DIR_MODE = 0o700
FILE_MODE = 0o600

SecretValue = bytes | str | SecretBytes | SecretStr


class SecretStoreError(Exception):
    """The secret store cannot be used as asked.  Messages name files, never values."""


class SecretNotFound(SecretStoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "secret not found"


class InsecureSecretFile(SecretStoreError):
    """A secret file or the store's directory is readable by others, or owned by someone else."""


def generate_key(nbytes: int = 64) -> bytes:
    """Random key material (64 bytes: a full block of HMAC-SHA512)."""
    return _random.token_bytes(nbytes)


def generate_password(nbytes: int = 32) -> str:
    """A random password safe in URLs and config files (URL-safe base64)."""
    return _random.token_urlsafe(nbytes)


def _as_bytes(value: SecretValue) -> bytes:
    if isinstance(value, SecretBytes | SecretStr):
        value = value.get_secret_value()
    return value.encode() if isinstance(value, str) else value


class SecretStore:
    """Secrets in files under ``root`` (``<data_dir>/secrets``).  Synchronous: the files are tiny and
    read at start-up."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def in_data_dir(cls, data_dir: Path | str) -> SecretStore:
        return cls(Path(data_dir) / "secrets")

    # -- reading --------------------------------------------------------------------------------

    def get(self, name: str) -> SecretBytes:
        """The secret ``name``.  Raises ``SecretNotFound`` or ``InsecureSecretFile``."""
        path = self._path(name)
        self._check_dir(create=False)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SecretNotFound(f"no secret named {name!r} in {self.root}") from None
        except OSError as exc:
            raise SecretStoreError(f"cannot open secret file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            self._check_file(path, info)
            value = f.read()
        register_secret(value)
        return SecretBytes(value)

    def get_text(self, name: str) -> SecretStr:
        try:
            text = self.get(name).get_secret_value().decode()
        except UnicodeDecodeError:
            raise SecretStoreError(f"secret {name!r} is not text") from None
        register_secret(text)
        return SecretStr(text)

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and _NAME.match(p.name))

    # -- writing --------------------------------------------------------------------------------

    def put(self, name: str, value: SecretValue) -> None:
        """Store ``value`` as ``name``, replacing what was there, atomically."""
        path = self._path(name)
        self._check_dir(create=True)
        tmp = self._write_temp(name, _as_bytes(value))
        try:
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._sync_dir()
        register_secret(_as_bytes(value))
        log.info("secret stored", secret_name=name)

    def ensure(self, name: str, generator: Callable[[], SecretValue]) -> SecretBytes:
        """The secret ``name``, created with ``generator()`` if it does not exist yet.

        Safe when several processes call it at once: the first to create the file wins and every
        caller gets that value (the file appears by ``link``, which never replaces).
        """
        path = self._path(name)
        self._check_dir(create=True)
        if not path.exists():
            tmp = self._write_temp(name, _as_bytes(generator()))
            try:
                os.link(tmp, path)
                self._sync_dir()
                log.info("secret created", secret_name=name)
            except FileExistsError:
                pass   # another process created it first; use theirs
            finally:
                os.unlink(tmp)
        return self.get(name)

    def ensure_text(self, name: str, generator: Callable[[], str] = generate_password) -> SecretStr:
        self.ensure(name, generator)
        return self.get_text(name)

    def delete(self, name: str) -> bool:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            return False
        self._sync_dir()
        log.info("secret deleted", secret_name=name)
        return True

    # -- internals ------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if not _NAME.match(name) or name in (".", ".."):
            raise SecretStoreError(f"bad secret name {name!r}: letters, digits, '.', '_', '-', at most 128, "
                                   "not starting with '.' or '-'")
        return self.root / name

    def _check_dir(self, *, create: bool) -> None:
        if create:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.root.mkdir(mode=DIR_MODE)
        try:
            info = os.lstat(self.root)
        except FileNotFoundError:
            raise SecretNotFound(f"the secret store {self.root} does not exist") from None
        if not stat.S_ISDIR(info.st_mode):
            raise SecretStoreError(f"{self.root} should be the secret store's directory and is not a directory")
        if info.st_uid != os.geteuid():
            raise InsecureSecretFile(f"the secret store {self.root} belongs to uid {info.st_uid}, not to the user "
                                     f"running roost (uid {os.geteuid()})")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise InsecureSecretFile(f"the secret store {self.root} is open to group or others "
                                     f"(mode {mode:04o}); fix it with: chmod 700 {self.root}")

    @staticmethod
    def _check_file(path: Path, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise SecretStoreError(f"secret file {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise InsecureSecretFile(f"secret file {path} belongs to uid {info.st_uid}, not to the user running "
                                     f"roost (uid {os.geteuid()})")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise InsecureSecretFile(f"secret file {path} is readable or writable by group or others "
                                     f"(mode {mode:04o}); refusing to use it. If it may have leaked, replace "
                                     f"the secret; then: chmod 600 {path}")

    def _write_temp(self, name: str, data: bytes) -> Path:
        tmp = self.root / f".{name}.{_random.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)          # whatever the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _sync_dir(self) -> None:
        fsync_dir(self.root)
