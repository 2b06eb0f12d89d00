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
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.core.logging import register_secret
from services.core.secrets import SecretStore, generate_key
from services.heartbeat.keys import CLUSTER_ID_BYTES, KEY_BYTES, MasterKey

__all__ = ["CLUSTER_ID_SECRET", "MASTER_KEY_SECRET", "ClusterKeys", "KeyStoreError", "ensure_cluster_keys",
           "load_cluster_keys"]

MASTER_KEY_SECRET = "heartbeat-master-key"
CLUSTER_ID_SECRET = "heartbeat-cluster-id"


class KeyStoreError(ValueError):
    """The stored keys are missing or malformed.  Messages name the secret, never its value."""


@dataclass(frozen=True, slots=True, repr=False)
class ClusterKeys:
    cluster_id: bytes
    master: MasterKey

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


def _new_master() -> bytes:
    key = base64.b64encode(generate_key(KEY_BYTES)).decode()
    return json.dumps({"generation": 1, "key": key}).encode()


def _new_cluster_id() -> bytes:
    return _random.token_bytes(CLUSTER_ID_BYTES).hex().encode()


def _parse(master_raw: bytes, cluster_raw: bytes) -> ClusterKeys:
    try:
        master = json.loads(master_raw)
    except ValueError:
        raise KeyStoreError(f"secret {MASTER_KEY_SECRET} is not JSON") from None
    if not isinstance(master, dict):
        raise KeyStoreError(f"secret {MASTER_KEY_SECRET} is not a JSON object")
    raw = {"cluster_id": cluster_raw.decode(errors="replace").strip(), "master_key": master.get("key"),
           "generation": master.get("generation", 1)}
    return ClusterKeys.from_credentials(raw, where=f"secrets {MASTER_KEY_SECRET} / {CLUSTER_ID_SECRET}")


def ensure_cluster_keys(store: SecretStore) -> tuple[ClusterKeys, bool]:
    """The cluster's keys, created first if they do not exist; and whether this call created them."""
    created = not store.exists(MASTER_KEY_SECRET)
    master = store.ensure(MASTER_KEY_SECRET, _new_master).get_secret_value()
    cluster = store.ensure(CLUSTER_ID_SECRET, _new_cluster_id).get_secret_value()
    return _parse(master, cluster), created


def load_cluster_keys(store: SecretStore) -> ClusterKeys:
    """The cluster's keys; ``KeyStoreError`` when they were never created here."""
    if not store.exists(MASTER_KEY_SECRET) or not store.exists(CLUSTER_ID_SECRET):
        raise KeyStoreError(f"no heartbeat keys in {store.root}: run `roost keys create` (or `roost up`)")
    return _parse(store.get(MASTER_KEY_SECRET).get_secret_value(), store.get(CLUSTER_ID_SECRET).get_secret_value())
