"""Where the heartbeat's cluster keys live: the local secret store (``<data_dir>/secrets``).

Two secrets, created together the first time anything asks (``roost up``, ``roost keys create``, the
service's start), never replaced behind an operator's back:

* ``heartbeat-master-key``: JSON ``{"generation": n, "key": <base64 of 64 random bytes>}``; the per-path
  HMAC-SHA512 keys are derived from it (``keys.MasterKey``);
* ``heartbeat-cluster-id``: 16 random bytes, hex: every datagram carries it, so a datagram of another
  cluster is dropped before anything else.

An agent gets both when it is enrolled (``roost agent enroll`` writes them into its credentials file,
which is ``0600``); an agent on this machine reads them from the store.  Key bytes never reach a log:
every value read is registered with the log redaction, and ``ClusterKeys``'s repr shows the fingerprint.

Rotation (``roost keys rotate``): the next key waits in ``heartbeat-master-key-next`` (same format, the
next generation) until every monitored host holds it and the monitor signs with it; then it replaces the
master key and the ``-next`` secret is removed.  A service restarted in between resumes the rotation.
Agents receive the next key sealed (:func:`seal_next`: AES-256-GCM under a key derived with HKDF-SHA512
from the current master key, the cluster id and the host name as associated data): only a holder of the
current key can read it, and the bus never carries a key in clear.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.core.logging import register_secret
from services.core.secrets import SecretNotFound, SecretStore, generate_key
from services.heartbeat.keys import CLUSTER_ID_BYTES, KEY_BYTES, MasterKey

__all__ = ["CLUSTER_ID_SECRET", "MASTER_KEY_SECRET", "NEXT_KEY_SECRET", "ClusterKeys", "KeyStoreError",
           "begin_rotation", "ensure_cluster_keys", "finish_rotation", "load_cluster_keys", "seal_next", "unseal_next"]

MASTER_KEY_SECRET = "heartbeat-master-key"
NEXT_KEY_SECRET = "heartbeat-master-key-next"
CLUSTER_ID_SECRET = "heartbeat-cluster-id"
_SEAL_LABEL = b"roost/heartbeat/v1/rotation/"


class KeyStoreError(ValueError):
    """The stored keys are missing or malformed.  Messages name the secret, never its value."""


@dataclass(frozen=True, slots=True, repr=False)
class ClusterKeys:
    cluster_id: bytes
    master: MasterKey
    next: MasterKey | None = None        # a rotation under way

    def __repr__(self) -> str:
        return f"ClusterKeys(cluster_id={self.cluster_id.hex()}, master={self.master!r})"

    @property
    def fingerprint(self) -> str:
        """The master key's id as operators see it (``roost keys status``): 8 hex digits."""
        return f"{self.master.key_id:08x}"

    def credentials(self) -> dict[str, Any]:
        """What an agent's credentials file holds (written ``0600``)."""
        return {"cluster_id": self.cluster_id.hex(), "generation": self.master.generation,
                "master_key": base64.b64encode(self.master.secret).decode()}

    @classmethod
    def from_credentials(cls, raw: Mapping[str, Any], where: str = "the credentials") -> ClusterKeys:
        try:
            cluster_id = bytes.fromhex(str(raw["cluster_id"]))
            secret = base64.b64decode(str(raw["master_key"]), validate=True)
            generation = int(raw.get("generation", 1))
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise KeyStoreError(f"{where}: the heartbeat keys are malformed ({type(exc).__name__})") from None
        register_secret(secret)
        register_secret(str(raw["master_key"]))
        if len(cluster_id) != CLUSTER_ID_BYTES:
            raise KeyStoreError(f"{where}: the heartbeat cluster id must have {CLUSTER_ID_BYTES} bytes")
        try:
            return cls(cluster_id, MasterKey(generation, secret))
        except ValueError as exc:
            raise KeyStoreError(f"{where}: {exc}") from None


def _new_master(generation: int = 1) -> bytes:
    key = base64.b64encode(generate_key(KEY_BYTES)).decode()
    return json.dumps({"generation": generation, "key": key}).encode()


def _stored(master: MasterKey) -> bytes:
    return json.dumps({"generation": master.generation, "key": base64.b64encode(master.secret).decode()}).encode()


def _new_cluster_id() -> bytes:
    return _random.token_bytes(CLUSTER_ID_BYTES).hex().encode()


def _parse(master_raw: bytes, cluster_raw: bytes, next_raw: bytes | None = None) -> ClusterKeys:
    def one(raw: bytes, name: str) -> ClusterKeys:
        try:
            master = json.loads(raw)
        except ValueError:
            raise KeyStoreError(f"secret {name} is not JSON") from None
        if not isinstance(master, dict):
            raise KeyStoreError(f"secret {name} is not a JSON object")
        fields = {"cluster_id": cluster_raw.decode(errors="replace").strip(), "master_key": master.get("key"),
                  "generation": master.get("generation", 1)}
        return ClusterKeys.from_credentials(fields, where=f"secrets {name} / {CLUSTER_ID_SECRET}")

    keys = one(master_raw, MASTER_KEY_SECRET)
    if next_raw is None:
        return keys
    upcoming = one(next_raw, NEXT_KEY_SECRET).master
    if upcoming == keys.master:
        return keys   # a rotation finishing: the master key is written, the -next secret not yet removed
    if upcoming.generation <= keys.master.generation:
        raise KeyStoreError(f"secret {NEXT_KEY_SECRET} is not newer than {MASTER_KEY_SECRET}: remove it")
    return ClusterKeys(keys.cluster_id, keys.master, upcoming)


def _read(store: SecretStore) -> ClusterKeys:
    # The master key before the next one: ``finish_rotation`` writes the master and then removes the next, so a
    # reader between the two sees the same key twice, never the next key beside the master it replaced.
    master = store.get(MASTER_KEY_SECRET).get_secret_value()
    try:
        upcoming: bytes | None = store.get(NEXT_KEY_SECRET).get_secret_value()
    except SecretNotFound:
        upcoming = None
    return _parse(master, store.get(CLUSTER_ID_SECRET).get_secret_value(), upcoming)


def ensure_cluster_keys(store: SecretStore) -> tuple[ClusterKeys, bool]:
    """The cluster's keys, created first if they do not exist; and whether this call created them."""
    created = not store.exists(MASTER_KEY_SECRET)
    store.ensure(MASTER_KEY_SECRET, _new_master)
    store.ensure(CLUSTER_ID_SECRET, _new_cluster_id)
    return _read(store), created


def load_cluster_keys(store: SecretStore) -> ClusterKeys:
    """The cluster's keys; ``KeyStoreError`` when they were never created here."""
    if not store.exists(MASTER_KEY_SECRET) or not store.exists(CLUSTER_ID_SECRET):
        raise KeyStoreError(f"no heartbeat keys in {store.root}: run `roost keys create` (or `roost up`)")
    return _read(store)


def begin_rotation(store: SecretStore) -> ClusterKeys:
    """Create the next key (one generation up) unless a rotation is already under way; the keys after."""
    keys = load_cluster_keys(store)
    if keys.next is None:
        store.ensure(NEXT_KEY_SECRET, lambda: _new_master(keys.master.generation + 1))
        keys = load_cluster_keys(store)
    return keys


def finish_rotation(store: SecretStore, new: MasterKey) -> ClusterKeys:
    """``new`` (the next key, now signing everywhere) becomes the master key; the ``-next`` secret goes."""
    keys = load_cluster_keys(store)
    if keys.master.key_id == new.key_id:
        return keys
    if keys.next is None or keys.next.key_id != new.key_id:
        raise KeyStoreError(f"key {new.key_id:08x} is not the rotation under way")
    store.put(MASTER_KEY_SECRET, _stored(new))
    store.delete(NEXT_KEY_SECRET)
    return ClusterKeys(keys.cluster_id, new)


def _seal_key(current: MasterKey, cluster_id: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA512(), length=32, salt=cluster_id, info=_SEAL_LABEL + b"seal")
    return AESGCM(hkdf.derive(current.secret))


def seal_next(current: MasterKey, new: MasterKey, cluster_id: bytes, hostname: str) -> str:
    """The next key for one host's agent: base64(nonce + AES-GCM(new key)), readable with ``current``."""
    nonce = _random.token_bytes(12)
    body = _seal_key(current, cluster_id).encrypt(nonce, new.secret, _SEAL_LABEL + hostname.encode())
    return base64.b64encode(nonce + body).decode()


def unseal_next(current: MasterKey, sealed: str, generation: int, cluster_id: bytes, hostname: str) -> MasterKey:
    try:
        raw = base64.b64decode(sealed, validate=True)
        secret = _seal_key(current, cluster_id).decrypt(raw[:12], raw[12:], _SEAL_LABEL + hostname.encode())
    except (binascii.Error, ValueError, InvalidTag):
        raise KeyStoreError("the sealed next key does not open with the current key") from None
    register_secret(secret)
    return MasterKey(generation, secret)
