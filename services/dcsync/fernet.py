"""keystone's Fernet key repository, carried from the system controller to every subcloud.

A repository is a directory of files named by integers (``0`` the staged key, the highest the primary),
each holding one URL-safe base64 key.  The controller reads it (``read_repository``), seals it for one
subcloud (AES-GCM under an HKDF of that subcloud's sync key, the subcloud's name as associated data: a
message for one subcloud is useless to another) and sends it; the agent unseals it and replaces its
repository file by file (each file written whole, 0600, then renamed into place; files the controller no
longer has are removed last), so keystone at the subcloud validates the tokens the controller issues, and
follows its rotations.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.core.files import fsync_dir

_KEY_FILE = re.compile(r"^[0-9]{1,6}$")
_INFO = b"roost dcsync fernet v1"


def sync_key_secret(subcloud: str) -> str:
    """The secret-store name of a subcloud's sync key: made when the subcloud is enrolled (``roost subcloud
    add``), written into its agent's credentials, used by the dcsync service to seal the keys it sends."""
    return f"dcsync-sync-key-{subcloud}"


class FernetError(ValueError):
    """A key repository or a sealed message that cannot be used.  Messages never hold key material."""


def read_repository(path: Path) -> dict[str, str]:
    if not path.is_dir():
        raise FernetError(f"{path} is not a Fernet key repository (no such directory)")
    keys = {}
    for f in sorted(path.iterdir()):
        if _KEY_FILE.match(f.name) and f.is_file():
            keys[f.name] = f.read_text().strip()
    if not keys:
        raise FernetError(f"{path} holds no Fernet keys")
    return keys


def fingerprint(keys: dict[str, str]) -> str:
    """Which keys these are, without revealing them (16 hex digits of a SHA-256)."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_of(path: Path) -> str | None:
    try:
        return fingerprint(read_repository(path))
    except FernetError:
        return None


def _aead(sync_key: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(sync_key))


def seal(sync_key: bytes, subcloud: str, keys: dict[str, str]) -> str:
    nonce = os.urandom(12)
    body = _aead(sync_key).encrypt(nonce, json.dumps(keys, sort_keys=True).encode(), subcloud.encode())
    return base64.b64encode(nonce + body).decode()


def unseal(sync_key: bytes, subcloud: str, sealed: str) -> dict[str, str]:
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = _aead(sync_key).decrypt(raw[:12], raw[12:], subcloud.encode())
        keys = json.loads(plain)
    except (InvalidTag, ValueError) as exc:
        raise FernetError(f"the Fernet keys were not sealed for subcloud {subcloud} with its sync key "
                          f"({type(exc).__name__})") from None
    if not isinstance(keys, dict) or not keys or not all(
            isinstance(k, str) and _KEY_FILE.match(k) and isinstance(v, str) for k, v in keys.items()):
        raise FernetError("the sealed Fernet keys are not a key repository")
    return keys


def write_repository(path: Path, keys: dict[str, str]) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, key in keys.items():
        tmp = path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path / name)
    for f in path.iterdir():
        if _KEY_FILE.match(f.name) and f.name not in keys:
            f.unlink()
    fsync_dir(path)
