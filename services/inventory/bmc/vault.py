"""BMC passwords encrypted at rest, and BMC access sealed for the heartbeat service.  Pure, no I/O
except ``PasswordVault.from_store`` / ``FencingSealer.from_store`` (which read the secret store).

**At rest** (inventory's database): AES-256-GCM with a 32-byte key from the secret store (secret
``inventory-bmc-key``), a fresh 12-byte nonce per encryption, and the host's uuid as associated data,
so a ciphertext copied onto another host's row does not decrypt.  What is stored is ``nonce +
ciphertext`` (bytes) plus the **key id** (a fingerprint of the key, never the key): decryption uses
whichever known key has that id, encryption always the primary.  Rotation: ``rotate_password_key``
moves the primary to ``inventory-bmc-key.retired.<key id>`` and creates a new primary; a vault loaded
afterwards still opens the old ciphertexts and ``PasswordVault.needs_reencryption`` says which rows to
re-encrypt.

**Sealed** (``roost.host.bmc_access`` for the heartbeat service, which must fence a controller while
inventory is down): ``seal(key, host_uuid, endpoint)`` is base64 of ``nonce + AES-GCM(JSON of address,
username, password, system_id, verify_tls, timeout)`` with the host's uuid as associated data, under a
separate key both services hold (secret ``bmc-fencing-key``).  ``unseal`` gives the ``BmcEndpoint``
back, or raises ``SealBroken`` for a wrong key, another host's text or altered text.

The two uses are domain-separated (a different label in the associated data), so a password ciphertext
can never be unsealed as an endpoint or the other way round, even under the same key.  No error message
ever carries a key, a password or a plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretBytes, SecretStr

from services.core.logging import register_secret
from services.core.secrets import SecretStore, generate_key
from services.inventory.bmc.abc import BmcEndpoint

PASSWORD_KEY_SECRET: Final = "inventory-bmc-key"
"""The secret store name of the primary at-rest key (inventory only)."""
RETIRED_PREFIX: Final = PASSWORD_KEY_SECRET + ".retired."
"""Retired at-rest keys, kept so old ciphertexts still open: ``inventory-bmc-key.retired.<key id>``."""
FENCING_KEY_SECRET: Final = "bmc-fencing-key"
"""The secret store name of the key inventory seals BMC access with and heartbeat unseals it with."""

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
SEALED_MAX: Final = 8192          # schemas.inventory.BmcAccess.sealed
_PASSWORD_AAD: Final = b"roost.bmc.password.v1\x00"
_SEAL_AAD: Final = b"roost.bmc.access.v1\x00"
_KEY_ID_LABEL: Final = b"roost.bmc.key-id.v1\x00"


class VaultError(Exception):
    """A BMC secret cannot be encrypted, decrypted, sealed or unsealed.  Messages never carry a secret."""


class UnknownKeyId(VaultError):
    """A ciphertext names a key this vault does not hold (retired and deleted, or from another site)."""


class DecryptionFailed(VaultError):
    """The ciphertext does not open: another host's, altered, or not made with the key it names."""


class SealBroken(VaultError):
    """A sealed BMC access does not open: wrong key, another host's, or altered."""


class Encrypted(NamedTuple):
    """A password encrypted at rest: ``nonce + ciphertext`` and the id of the key that made it.
    Unpacks as ``ciphertext, key_id = vault.encrypt(...)``."""

    ciphertext: bytes
    key_id: str


# -- keys -------------------------------------------------------------------------------------------


def new_key() -> bytes:
    """A fresh 32-byte AES-256 key."""
    return generate_key(KEY_BYTES)


def _key_bytes(key: bytes | SecretBytes) -> bytes:
    raw = key.get_secret_value() if isinstance(key, SecretBytes) else key
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise VaultError(f"a BMC key must be {KEY_BYTES} bytes (got {size})")
    return raw


def key_id(key: bytes | SecretBytes) -> str:
    """The key's id: 16 hex digits of a labelled SHA-256 of it.  Safe to store and show; says nothing of
    the key."""
    return hashlib.sha256(_KEY_ID_LABEL + _key_bytes(key)).hexdigest()[:16]


def _aad(label: bytes, host_uuid: str) -> bytes:
    if not host_uuid:
        raise VaultError("a host uuid is needed as the associated data")
    return label + host_uuid.encode()


def _password_text(password: str | SecretStr) -> str:
    return password.get_secret_value() if isinstance(password, SecretStr) else password


# -- at rest ----------------------------------------------------------------------------------------


def encrypt_password(key: bytes | SecretBytes, host_uuid: str, password: str | SecretStr) -> bytes:
    """``nonce + AES-GCM(password)`` bound to ``host_uuid``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(_key_bytes(key)).encrypt(nonce, _password_text(password).encode(),
                                                   _aad(_PASSWORD_AAD, host_uuid))


def decrypt_password(key: bytes | SecretBytes, host_uuid: str, ciphertext: bytes) -> SecretStr:
    """The password ``encrypt_password`` encrypted for ``host_uuid``; ``DecryptionFailed`` otherwise."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise DecryptionFailed(f"the BMC password of host {host_uuid} is not a ciphertext (too short)")
    try:
        plain = AESGCM(_key_bytes(key)).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                                _aad(_PASSWORD_AAD, host_uuid))
    except InvalidTag:
        raise DecryptionFailed(f"the BMC password of host {host_uuid} does not decrypt: it belongs to another "
                               "host, was altered, or was not made with this key") from None
    try:
        text = plain.decode()
    except UnicodeDecodeError:
        raise DecryptionFailed(f"the BMC password of host {host_uuid} is not text") from None
    register_secret(text)
    return SecretStr(text)


class KeyRing:
    """A primary key (encrypts, seals) and older ones (still open what they made), by key id."""

    def __init__(self, primary: bytes | SecretBytes, older: Iterable[bytes | SecretBytes] = ()) -> None:
        self.primary = _key_bytes(primary)
        self.keys: dict[str, bytes] = {}
        for key in (*older, primary):
            raw = _key_bytes(key)
            self.keys[key_id(raw)] = raw
        self.primary_id = key_id(self.primary)

    def __repr__(self) -> str:
        return f"KeyRing(primary={self.primary_id}, keys={sorted(self.keys)})"

    def get(self, wanted: str, missing: Callable[[str], VaultError]) -> bytes:
        """The key with id ``wanted``, or ``missing(the ids held)`` raised."""
        key = self.keys.get(wanted)
        if key is None:
            raise missing(", ".join(sorted(self.keys)))
        return key


class PasswordVault:
    """At-rest encryption of BMC passwords with a primary key and any number of older ones."""

    def __init__(self, primary: bytes | SecretBytes, older: Iterable[bytes | SecretBytes] = ()) -> None:
        self._ring = KeyRing(primary, older)
        self._primary = self._ring.primary
        self._keys = self._ring.keys
        self.primary_key_id = self._ring.primary_id

    def __repr__(self) -> str:
        return f"PasswordVault(primary={self.primary_key_id}, keys={sorted(self._keys)})"

    @classmethod
    def from_store(cls, store: SecretStore, name: str = PASSWORD_KEY_SECRET) -> PasswordVault:
        """The primary key ``name`` (created on first use) and every retired one (``<name>.retired.*``)."""
        primary = store.ensure(name, new_key)
        retired_prefix = name + ".retired."
        older = [store.get(n) for n in store.names() if n.startswith(retired_prefix)]
        return cls(primary, older)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def encrypt(self, host_uuid: str, password: str | SecretStr) -> Encrypted:
        return Encrypted(encrypt_password(self._primary, host_uuid, password), self.primary_key_id)

    def decrypt(self, host_uuid: str, ciphertext: bytes, key_id: str) -> SecretStr:
        key = self._ring.get(key_id, lambda held: UnknownKeyId(
            f"the BMC password of host {host_uuid} was encrypted with key {key_id!r}, which this vault does "
            f"not hold (it has {held})"))
        return decrypt_password(key, host_uuid, ciphertext)

    def needs_reencryption(self, key_id: str | None) -> bool:
        """True when a ciphertext made with ``key_id`` should be re-encrypted with the primary key."""
        return key_id is not None and key_id != self.primary_key_id

    def reencrypt(self, host_uuid: str, ciphertext: bytes, key_id: str) -> Encrypted:
        return self.encrypt(host_uuid, self.decrypt(host_uuid, ciphertext, key_id))


def rotate_password_key(store: SecretStore, name: str = PASSWORD_KEY_SECRET) -> str:
    """Retire the primary at-rest key (kept as ``<name>.retired.<key id>``) and create a new one; returns
    the new key's id.  Re-encrypt the stored passwords afterwards (``PasswordVault.needs_reencryption``)."""
    current = store.ensure(name, new_key)
    store.put(f"{name}.retired.{key_id(current)}", current)
    fresh = new_key()
    store.put(name, fresh)
    return key_id(fresh)


# -- sealed for the heartbeat service ------------------------------------------------------------------


def seal(key: bytes | SecretBytes, host_uuid: str, endpoint: BmcEndpoint) -> str:
    """Base64 of ``nonce + AES-GCM(JSON of the endpoint)``, bound to ``host_uuid``."""
    document = {"address": endpoint.address, "username": endpoint.username,
                "password": endpoint.password.get_secret_value(), "system_id": endpoint.system_id,
                "verify_tls": endpoint.verify_tls, "timeout": endpoint.timeout}
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_key_bytes(key)).encrypt(nonce, json.dumps(document, separators=(",", ":")).encode(),
                                             _aad(_SEAL_AAD, host_uuid))
    text = base64.b64encode(nonce + sealed).decode("ascii")
    if len(text) > SEALED_MAX:
        raise VaultError(f"the sealed BMC access of host {host_uuid} is longer than {SEALED_MAX} characters")
    return text


def unseal(key: bytes | SecretBytes, host_uuid: str, sealed: str) -> BmcEndpoint:
    """The ``BmcEndpoint`` ``seal`` sealed for ``host_uuid``; ``SealBroken`` for a wrong key, another
    host's text or altered text."""
    try:
        blob = base64.b64decode(sealed.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SealBroken(f"the sealed BMC access of host {host_uuid} is not base64") from None
    if len(blob) < NONCE_BYTES + 16:
        raise SealBroken(f"the sealed BMC access of host {host_uuid} is too short")
    try:
        plain = AESGCM(_key_bytes(key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(_SEAL_AAD, host_uuid))
    except InvalidTag:
        raise SealBroken(f"the sealed BMC access of host {host_uuid} does not open: wrong key, another host's, "
                         "or altered") from None
    try:
        document: Any = json.loads(plain)
        endpoint = BmcEndpoint(address=str(document["address"]), username=str(document["username"]),
                               password=SecretStr(str(document["password"])),
                               system_id=None if document.get("system_id") is None else str(document["system_id"]),
                               verify_tls=bool(document.get("verify_tls", True)),
                               timeout=float(document.get("timeout", 5.0)))
    except (ValueError, KeyError, TypeError):
        raise SealBroken(f"the sealed BMC access of host {host_uuid} opens but is not a BMC endpoint") from None
    register_secret(endpoint.password)
    return endpoint


class FencingSealer:
    """Seals BMC access for the heartbeat service (inventory) and unseals it (heartbeat), with the
    fencing key and, for unsealing, older fencing keys by id."""

    def __init__(self, primary: bytes | SecretBytes, older: Iterable[bytes | SecretBytes] = ()) -> None:
        self._ring = KeyRing(primary, older)
        self._primary = self._ring.primary
        self.key_id = self._ring.primary_id

    def __repr__(self) -> str:
        return f"FencingSealer(key_id={self.key_id})"

    @classmethod
    def from_store(cls, store: SecretStore, name: str = FENCING_KEY_SECRET) -> FencingSealer:
        """The fencing key ``name`` (created on first use: both services share one data directory under
        ``roost up``; elsewhere the operator installs the same key in both)."""
        return cls(store.ensure(name, new_key))

    def seal(self, host_uuid: str, endpoint: BmcEndpoint) -> tuple[str, str]:
        """``(key_id, sealed)``: the fields of ``roost.host.bmc_access``."""
        return self.key_id, seal(self._primary, host_uuid, endpoint)

    def unseal(self, host_uuid: str, key_id: str, sealed: str) -> BmcEndpoint:
        key = self._ring.get(key_id, lambda held: SealBroken(
            f"the BMC access of host {host_uuid} is sealed with key {key_id!r}, which this service does not "
            f"hold (it has {held})"))
        return unseal(key, host_uuid, sealed)
