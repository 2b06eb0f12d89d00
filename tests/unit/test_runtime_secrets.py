"""The local secret store: modes, atomic writes, refusal of readable files, values never logged."""

from __future__ import annotations

import io
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
import structlog

from services.core.logging import configure_logging, reset_logging
from services.core.secrets import (
    InsecureSecretFile,
    SecretNotFound,
    SecretStore,
    SecretStoreError,
    generate_key,
)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore.in_data_dir(tmp_path / "data")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_put_and_get_with_owner_only_modes(store: SecretStore) -> None:
    old = os.umask(0o022)
    try:
        store.put("hmac-master", b"\x00\x01planted-key")
        store.put("broker-password.inventory", "planted-pw-text")
    finally:
        os.umask(old)
    assert mode(store.root) == 0o700
    assert mode(store.root / "hmac-master") == 0o600
    assert store.get("hmac-master").get_secret_value() == b"\x00\x01planted-key"
    assert store.get_text("broker-password.inventory").get_secret_value() == "planted-pw-text"
    assert store.names() == ["broker-password.inventory", "hmac-master"]
    assert "planted" not in repr(store.get("hmac-master"))
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_put_replaces_atomically(store: SecretStore) -> None:
    store.put("k", b"one")
    inode = (store.root / "k").stat().st_ino
    store.put("k", b"two")
    assert store.get("k").get_secret_value() == b"two"
    assert (store.root / "k").stat().st_ino != inode, "a new file renamed over the old one"


def test_missing_and_bad_names(store: SecretStore) -> None:
    with pytest.raises(SecretNotFound):
        store.get("nothing")
    store.put("a", b"x")
    with pytest.raises(SecretNotFound, match="no secret named 'nothing'"):
        store.get("nothing")
    for bad in ("../escape", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(SecretStoreError, match="bad secret name"):
            store.put(bad, b"x")
    assert store.delete("a") is True and store.delete("a") is False


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644, 0o660])
def test_a_file_readable_by_others_is_refused(store: SecretStore, loose: int) -> None:
    store.put("k", b"planted-value-1")
    os.chmod(store.root / "k", loose)
    with pytest.raises(InsecureSecretFile, match=rf"mode {loose:04o}.*chmod 600"):
        store.get("k")


def test_an_open_directory_is_refused(store: SecretStore) -> None:
    store.put("k", b"planted-value-1")
    os.chmod(store.root, 0o755)
    with pytest.raises(InsecureSecretFile, match="chmod 700"):
        store.get("k")


def test_a_symlink_is_refused(store: SecretStore, tmp_path: Path) -> None:
    store.put("k", b"planted-value-1")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    os.chmod(target, 0o600)
    (store.root / "link").symlink_to(target)
    with pytest.raises(SecretStoreError, match="cannot open"):
        store.get("link")


def test_ensure_creates_once_and_keeps_the_value(store: SecretStore) -> None:
    calls: list[int] = []

    def gen() -> bytes:
        calls.append(1)
        return generate_key()

    first = store.ensure("hmac", gen)
    assert len(first.get_secret_value()) == 64
    assert store.ensure("hmac", gen) == first
    assert len(calls) == 1
    assert len(store.ensure_text("password").get_secret_value()) >= 40


def _ensure_in_child(root: str, queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(SecretStore(root).ensure("race", generate_key).get_secret_value())


def test_concurrent_ensure_gives_every_process_the_same_value(store: SecretStore) -> None:
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(store.root), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    values = {queue.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(timeout=30)
    assert len(values) == 1
    assert store.get("race").get_secret_value() in values


def test_values_are_never_logged_even_by_mistake(store: SecretStore) -> None:
    buf = io.StringIO()
    configure_logging("json", "DEBUG", stream=buf)
    try:
        key = store.ensure("hmac", generate_key)
        password = store.ensure_text("broker-password")
        store.put("webhook", "whsec-planted-value-123")
        log = structlog.get_logger("careless")
        log.info("using", key=key, raw=key.get_secret_value().hex(), pw=password.get_secret_value(),
                 text=f"webhook secret is {store.get_text('webhook').get_secret_value()}")
    finally:
        reset_logging()
    out = buf.getvalue()
    assert "secret created" in out and "hmac" in out
    for value in (key.get_secret_value().hex(), password.get_secret_value(), "whsec-planted-value-123"):
        assert value not in out
