"""Which hosts the heartbeat monitor watches, from inventory's host records (``hostbook``), and the
cluster keys in the secret store, their rotation and sealing (``keystore``)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.inventory import Host
from services.core.secrets import SecretStore
from services.heartbeat.hostbook import HostBook, Target, target_of
from services.heartbeat.keystore import (
    MASTER_KEY_SECRET,
    ClusterKeys,
    KeyStoreError,
    begin_rotation,
    ensure_cluster_keys,
    finish_rotation,
    load_cluster_keys,
    seal_next,
    unseal_next,
)
from services.heartbeat.model import Path as HbPath
from services.heartbeat.service import monitor_node_id

NOW = datetime(2026, 11, 21, tzinfo=UTC)
BOTH = (HbPath.MGMT, HbPath.CLUSTER_HOST)


def host(version: int = 1, **changes: Any) -> Host:
    data: dict[str, Any] = {
        "uuid": "u-1", "node_id": 7, "hostname": "worker-1", "personality": "worker", "administrative": "unlocked",
        "operational": "enabled", "availability": "available", "provision": "provisioned",
        "addresses": {"mgmt": "10.0.0.7", "cluster-host": "10.1.0.7", "oam": "10.2.0.7"}, "agent": "worker-1",
        "created_at": NOW, "updated_at": NOW, "version": version}
    data.update(changes)
    return Host.model_validate(data)


def test_an_unlocked_provisioned_host_is_monitored_on_the_networks_the_monitor_has() -> None:
    target = target_of(host(), own_hostname="controller-0", networks=BOTH)
    assert target == Target("u-1", "worker-1", 7, {HbPath.MGMT: "10.0.0.7", HbPath.CLUSTER_HOST: "10.1.0.7"},
                            "worker-1", "worker")


@pytest.mark.parametrize("changes", [
    {"administrative": "locked"}, {"provision": "unprovisioned"}, {"hostname": None},
    {"hostname": "controller-0", "personality": "controller"}, {"addresses": {"oam": "10.2.0.7"}},
])
def test_hosts_not_monitored(changes: dict[str, Any]) -> None:
    assert target_of(host(**changes), own_hostname="controller-0", networks=BOTH) is None


def test_the_newest_version_wins_whatever_the_order() -> None:
    book = HostBook(own_hostname="controller-0", networks=BOTH)
    added = book.apply(host(1))
    assert added is not None and added.before is None and added.after is not None
    assert book.apply(host(1)) is None, "a repeated record changes nothing"
    locked = book.apply(host(3, administrative="locked"))
    assert locked is not None and locked.after is None
    assert book.apply(host(2)) is None, "an older record arriving late never undoes a newer one"
    assert "u-1" not in book.targets
    moved = book.apply(host(4, addresses={"mgmt": "10.0.0.8"}))
    assert moved is not None and moved.after is not None and moved.after.addresses == {HbPath.MGMT: "10.0.0.8"}
    assert book.apply(host(5, addresses={"mgmt": "10.0.0.8"}, location="rack 2")) is None, \
        "a change the monitor does not care about"
    deleted = book.delete("u-1", 6)
    assert deleted is not None and deleted.after is None and not book.targets
    assert book.apply(host(5)) is None, "a record older than the deletion does not bring the host back"


def test_monitor_node_ids_are_above_inventorys_and_distinct_per_controller() -> None:
    ids = [monitor_node_id(c) for c in ("controller-0", "controller-1", "edge-ctl")]
    assert len(set(ids)) == 3 and all(0xF000_0000 <= i <= 0xFFFF_FFFF for i in ids)
    assert ids[0] < ids[1], "controller-0 is the pair's preferred controller at start-up"


def test_cluster_keys_are_created_once_and_never_replaced(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    with pytest.raises(KeyStoreError, match="roost keys create"):
        load_cluster_keys(store)
    keys, created = ensure_cluster_keys(store)
    again, created_again = ensure_cluster_keys(store)
    assert created and not created_again
    assert again.master.key_id == keys.master.key_id and again.cluster_id == keys.cluster_id
    assert load_cluster_keys(store).fingerprint == keys.fingerprint == f"{keys.master.key_id:08x}"
    assert keys.master.secret.hex() not in repr(keys) and keys.fingerprint in repr(keys)
    assert ClusterKeys.from_credentials(json.loads(json.dumps(keys.credentials()))).fingerprint == keys.fingerprint


def test_malformed_keys_are_a_clear_error_that_shows_no_value(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    ensure_cluster_keys(store)
    store.put(MASTER_KEY_SECRET, json.dumps({"generation": 1, "key": "c2hvcnQ="}))
    with pytest.raises(KeyStoreError, match="at least 32 bytes") as err:
        load_cluster_keys(store)
    assert "c2hvcnQ" not in str(err.value)
    with pytest.raises(KeyStoreError, match="malformed"):
        ClusterKeys.from_credentials({"cluster_id": "zz", "master_key": "!!"})


def test_a_rotation_keeps_the_next_key_aside_until_it_is_finished(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    first, _ = ensure_cluster_keys(store)
    rotating = begin_rotation(store)
    assert rotating.master.key_id == first.master.key_id and rotating.next is not None
    assert rotating.next.generation == 2
    assert begin_rotation(store).next == rotating.next, "asking again shows the rotation under way"
    assert load_cluster_keys(store).next == rotating.next, "a restarted service resumes it"
    with pytest.raises(KeyStoreError, match="not the rotation under way"):
        finish_rotation(store, ensure_cluster_keys(SecretStore(tmp_path / "elsewhere"))[0].master)
    done = finish_rotation(store, rotating.next)
    assert done.master.key_id == rotating.next.key_id and done.next is None
    assert load_cluster_keys(store).fingerprint == done.fingerprint and not store.exists("heartbeat-master-key-next")


def test_a_reader_between_the_two_writes_of_a_finishing_rotation_sees_the_new_key(tmp_path: Path) -> None:
    """``finish_rotation`` writes the master key and then removes the -next secret; a reader in between (another
    process: the CLI, a test) sees the same key twice and takes it as the master, not as a broken store."""
    store = SecretStore(tmp_path / "secrets")
    ensure_cluster_keys(store)
    rotating = begin_rotation(store)
    assert rotating.next is not None
    store.put(MASTER_KEY_SECRET, store.get("heartbeat-master-key-next").get_secret_value())
    between = load_cluster_keys(store)
    assert between.master == rotating.next and between.next is None
    other = base64.b64encode(bytes(range(64))).decode()
    store.put("heartbeat-master-key-next", json.dumps({"generation": 2, "key": other}).encode())
    with pytest.raises(KeyStoreError, match="not newer"):
        load_cluster_keys(store)


def test_the_next_key_is_sealed_for_one_host_and_opens_only_with_the_current_key(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    ensure_cluster_keys(store)
    keys = begin_rotation(store)
    assert keys.next is not None
    sealed = seal_next(keys.master, keys.next, keys.cluster_id, "worker-1")
    assert keys.next.secret.hex() not in sealed
    opened = unseal_next(keys.master, sealed, 2, keys.cluster_id, "worker-1")
    assert opened.key_id == keys.next.key_id
    for args in ((keys.next, sealed, "worker-1"), (keys.master, sealed, "worker-2"),
                 (keys.master, sealed[:-4] + "AAAA", "worker-1")):
        with pytest.raises(KeyStoreError, match="does not open"):
            unseal_next(args[0], args[1], 2, keys.cluster_id, args[2])
