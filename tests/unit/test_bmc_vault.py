"""BMC passwords at rest (AES-GCM, bound to the host, key ids for rotation) and BMC access sealed for the
heartbeat service."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from schemas.inventory import BmcAccess
from services.core.secrets import SecretStore
from services.inventory.bmc.abc import BmcEndpoint
from services.inventory.bmc.vault import (
    FENCING_KEY_SECRET,
    PASSWORD_KEY_SECRET,
    DecryptionFailed,
    FencingSealer,
    PasswordVault,
    SealBroken,
    UnknownKeyId,
    VaultError,
    decrypt_password,
    encrypt_password,
    key_id,
    new_key,
    rotate_password_key,
    seal,
    unseal,
)

HOST = "6f1c1a52-8d7e-4c1e-9a57-2f1f5c3b9d01"
OTHER_HOST = "0b7f7d0e-53b4-4d36-8f5e-8f5ad3b0a2c2"
PASSWORD = "BMC-pa55word-very-secret"

ENDPOINT = BmcEndpoint(address="https://10.10.10.3", username="root", password=SecretStr(PASSWORD),
                       system_id="System.Embedded.1", verify_tls=False, timeout=7.5)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(tmp_path / "secrets")


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# -- at rest ---------------------------------------------------------------------------------------------


def test_round_trip_and_never_in_clear() -> None:
    vault = PasswordVault(new_key())
    first = vault.encrypt(HOST, PASSWORD)
    second = vault.encrypt(HOST, SecretStr(PASSWORD))
    assert first.key_id == second.key_id == vault.primary_key_id
    assert first.ciphertext != second.ciphertext, "a fresh nonce each time"
    assert PASSWORD.encode() not in first.ciphertext
    ciphertext, kid = first                                  # unpacks as (bytes, key id)
    opened = vault.decrypt(HOST, ciphertext, kid)
    assert isinstance(opened, SecretStr) and opened.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(opened)


def test_a_ciphertext_cannot_move_to_another_host() -> None:
    vault = PasswordVault(new_key())
    ciphertext, kid = vault.encrypt(HOST, PASSWORD)
    with pytest.raises(DecryptionFailed, match=f"host {OTHER_HOST} does not decrypt: it belongs to another host"):
        vault.decrypt(OTHER_HOST, ciphertext, kid)


@pytest.mark.parametrize("index", [0, 11, 12, -1])             # the nonce, the ciphertext, the tag
def test_a_tampered_ciphertext_is_refused(index: int) -> None:
    vault = PasswordVault(new_key())
    ciphertext, kid = vault.encrypt(HOST, PASSWORD)
    with pytest.raises(DecryptionFailed) as caught:
        vault.decrypt(HOST, flip(ciphertext, index), kid)
    assert PASSWORD not in str(caught.value)


def test_short_or_foreign_ciphertexts_are_refused() -> None:
    key = new_key()
    with pytest.raises(DecryptionFailed, match="too short"):
        decrypt_password(key, HOST, b"\x00" * 20)
    with pytest.raises(DecryptionFailed, match="not made with this key"):
        decrypt_password(new_key(), HOST, encrypt_password(key, HOST, PASSWORD))


def test_keys_must_be_32_bytes() -> None:
    with pytest.raises(VaultError, match="must be 32 bytes \\(got 16\\)"):
        PasswordVault(os.urandom(16))
    with pytest.raises(VaultError, match="must be 32 bytes"):
        seal(b"short", HOST, ENDPOINT)


def test_key_ids_are_stable_fingerprints() -> None:
    key = new_key()
    assert key_id(key) == key_id(key) and len(key_id(key)) == 16
    assert key_id(key) != key_id(new_key())
    assert key_id(key) not in (key.hex(), base64.b64encode(key).decode())
    vault = PasswordVault(key)
    assert key.hex() not in repr(vault) and vault.primary_key_id in repr(vault)


def test_an_unknown_key_id_is_named() -> None:
    vault = PasswordVault(new_key())
    ciphertext = PasswordVault(new_key()).encrypt(HOST, PASSWORD).ciphertext
    with pytest.raises(UnknownKeyId, match="key 'feedfacefeedface', which this vault does not hold"):
        vault.decrypt(HOST, ciphertext, "feedfacefeedface")


def test_rotation_keeps_old_ciphertexts_readable(store: SecretStore) -> None:
    before = PasswordVault.from_store(store)
    assert store.exists(PASSWORD_KEY_SECRET)
    assert stat.S_IMODE(os.stat(store.root / PASSWORD_KEY_SECRET).st_mode) == 0o600
    assert PasswordVault.from_store(store).primary_key_id == before.primary_key_id, "created once"
    old = before.encrypt(HOST, PASSWORD)

    new_id = rotate_password_key(store)
    after = PasswordVault.from_store(store)
    assert after.primary_key_id == new_id != old.key_id
    assert after.key_ids == {old.key_id, new_id}
    assert store.exists(f"{PASSWORD_KEY_SECRET}.retired.{old.key_id}")
    assert after.needs_reencryption(old.key_id) and not after.needs_reencryption(new_id)
    assert not after.needs_reencryption(None)
    assert after.decrypt(HOST, *old).get_secret_value() == PASSWORD
    fresh = after.reencrypt(HOST, *old)
    assert fresh.key_id == new_id and after.decrypt(HOST, *fresh).get_secret_value() == PASSWORD
    with pytest.raises(UnknownKeyId):
        before.decrypt(HOST, *fresh)                         # the old vault never saw the new key


@settings(max_examples=50, deadline=None)
@given(password=st.text(max_size=255), host=st.uuids().map(str))
def test_any_password_round_trips(password: str, host: str) -> None:
    vault = PasswordVault(bytes(range(32)))
    assert vault.decrypt(host, *vault.encrypt(host, password)).get_secret_value() == password


# -- sealed for the heartbeat service ------------------------------------------------------------------------


def test_seal_round_trip() -> None:
    key = new_key()
    sealed = seal(key, HOST, ENDPOINT)
    assert PASSWORD not in sealed and PASSWORD.encode() not in base64.b64decode(sealed)
    assert unseal(key, HOST, sealed) == ENDPOINT
    assert seal(key, HOST, ENDPOINT) != sealed, "a fresh nonce each time"
    BmcAccess.model_validate({"entity_id": HOST, "version": 1, "hostname": "controller-0",
                              "key_id": key_id(key), "sealed": sealed})


def test_unseal_refuses_a_wrong_key_another_host_or_tampering() -> None:
    key = new_key()
    sealed = seal(key, HOST, ENDPOINT)
    blob = base64.b64decode(sealed)
    cases = {
        "wrong key": (new_key(), HOST, sealed),
        "another host": (key, OTHER_HOST, sealed),
        "tampered": (key, HOST, base64.b64encode(flip(blob, len(blob) // 2)).decode()),
        "truncated": (key, HOST, base64.b64encode(blob[:-1]).decode()),
    }
    for name, (k, host, text) in cases.items():
        with pytest.raises(SealBroken, match="does not open: wrong key, another host's, or altered") as caught:
            unseal(k, host, text)
        assert PASSWORD not in str(caught.value), name
    with pytest.raises(SealBroken, match="not base64"):
        unseal(key, HOST, "not base64 at all!")
    with pytest.raises(SealBroken, match="too short"):
        unseal(key, HOST, base64.b64encode(b"x" * 10).decode())


def test_a_password_ciphertext_is_not_a_sealed_endpoint() -> None:
    """The two uses are domain-separated: the same key and host never open one as the other."""
    key = new_key()
    at_rest = base64.b64encode(encrypt_password(key, HOST, PASSWORD)).decode()
    with pytest.raises(SealBroken):
        unseal(key, HOST, at_rest)
    with pytest.raises(DecryptionFailed):
        decrypt_password(key, HOST, base64.b64decode(seal(key, HOST, ENDPOINT)))


def test_inventory_and_heartbeat_share_the_fencing_key(tmp_path: Path) -> None:
    inventory = FencingSealer.from_store(SecretStore(tmp_path / "secrets"))
    heartbeat = FencingSealer.from_store(SecretStore(tmp_path / "secrets"))
    assert (tmp_path / "secrets" / FENCING_KEY_SECRET).exists()
    kid, sealed = inventory.seal(HOST, ENDPOINT)
    assert kid == inventory.key_id == heartbeat.key_id
    opened = heartbeat.unseal(HOST, kid, sealed)
    assert opened.password.get_secret_value() == PASSWORD and opened.system_id == "System.Embedded.1"
    assert PASSWORD not in repr(opened) and PASSWORD not in repr(heartbeat)
    with pytest.raises(SealBroken, match="sealed with key 'feedfacefeedface', which this service does not hold"):
        heartbeat.unseal(HOST, "feedfacefeedface", sealed)


def test_an_older_fencing_key_still_unseals() -> None:
    old, new = new_key(), new_key()
    kid, sealed = FencingSealer(old).seal(HOST, ENDPOINT)
    assert FencingSealer(new, older=[old]).unseal(HOST, kid, sealed) == ENDPOINT


def test_the_at_rest_and_fencing_keys_are_different_secrets(store: SecretStore) -> None:
    assert PasswordVault.from_store(store).primary_key_id != FencingSealer.from_store(store).key_id
