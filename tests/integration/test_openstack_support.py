"""The openstack test support: real keystone and glance schemas from templates, keystone's own login and tokens.

These are the parts the dcsync tests stand on, checked against the real keystone 30.0.0 and glance 33.0.0 of
the openstack venv (made on first use by scripts/openstack-venv.sh: the timeout covers that first install).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.openstack import (
    TEMPLATES,
    create_keystone_database,
    drop_database,
    ensure_template,
    glance_create_image,
    glance_get_image,
    keystone_authenticate,
    keystone_bootstrap,
    keystone_check,
    keystone_fernet_rotate,
    keystone_fernet_setup,
    keystone_issue_token,
    keystone_validate_token,
    openstack_database,
    openstack_venv_async,
    pins_hash,
)
from tests.support.postgres import ADMIN_URL, database_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(900)]

PASSWORD = "correct horse battery staple"      # the test's own: never in a log, only in assertions
CONSTRAINTS = Path(__file__).resolve().parents[1] / "openstack" / "constraints.txt"


@pytest.fixture
async def keystone_db() -> AsyncIterator[str]:
    async with openstack_database("keystone") as name:
        yield name


@pytest.fixture
async def glance_db() -> AsyncIterator[str]:
    async with openstack_database("glance") as name:
        yield name


async def _fetch(db: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url(db), timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def _tables(db: str) -> set[str]:
    rows = await _fetch(db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    return {r["table_name"] for r in rows}


def _pins() -> set[str]:
    lines = CONSTRAINTS.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


async def test_the_venv_has_the_pinned_keystone_and_glance() -> None:
    venv = await openstack_venv_async()
    proc = await asyncio.create_subprocess_exec(str(venv / "bin" / "python"), "-m", "pip", "freeze",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    frozen = set(out.decode().split())
    assert {"keystone==30.0.0", "glance==33.0.0", "psycopg2-binary==2.9.13"} <= frozen
    pinned = _pins()
    assert pinned <= frozen, f"installed differently from the constraints: {sorted(pinned - frozen)}"


async def test_databases_are_copies_of_templates_made_by_db_sync(keystone_db: str, glance_db: str) -> None:
    keystone = await _tables(keystone_db)
    assert {"user", "local_user", "password", "project", "role", "assignment", "revocation_event",
            "alembic_version"} <= keystone
    glance = await _tables(glance_db)
    assert {"images", "image_properties", "image_tags", "image_members", "image_locations",
            "alembic_version"} <= glance
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        for kind, template in TEMPLATES.items():
            comment = await admin.fetchval("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                                           "WHERE datname = $1", template)
            assert comment == f"roost openstack template, {kind} db_sync, pins {pins_hash()}"
    finally:
        await admin.close()
    assert await ensure_template("keystone") == TEMPLATES["keystone"]      # ready: nothing rebuilt
    # the copies start empty of rows but keystone's own (the root domain placeholder)
    assert await _fetch(keystone_db, 'SELECT id FROM "user"') == []


async def test_a_template_of_other_pins_or_half_built_is_rebuilt() -> None:
    template = await ensure_template("glance")
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await admin.execute(f"COMMENT ON DATABASE {template} IS 'roost openstack template, glance db_sync, pins old'")
        assert await ensure_template("glance") == template
        comment = await admin.fetchval("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                                       "WHERE datname = $1", template)
        assert comment == f"roost openstack template, glance db_sync, pins {pins_hash()}"
    finally:
        await admin.close()
    async with openstack_database("glance") as db:
        assert "images" in await _tables(db)


async def test_drop_database_ends_open_connections() -> None:
    name = f"roost_test_drop_{uuid.uuid4().hex[:12]}"
    await create_keystone_database(name)
    conn = await asyncpg.connect(database_url(name), timeout=10)
    try:
        await drop_database(name)
        rows = await _fetch("postgres", "SELECT 1 FROM pg_database WHERE datname = $1", name)
        assert rows == []
    finally:
        await conn.close()
    await drop_database(name)            # a database that is gone: nothing to do


async def test_bootstrap_then_login_with_keystones_own_password_check(keystone_db: str, tmp_path: Path) -> None:
    repo = await keystone_fernet_setup(tmp_path / "fernet-keys")
    ids = await keystone_bootstrap(keystone_db, user="alice", password=PASSWORD, project="edge", role="operator",
                                   key_repository=repo)
    rows = await _fetch(keystone_db, "SELECT a.actor_id, a.target_id, a.role_id, a.type, lu.name "
                        "FROM assignment a JOIN local_user lu ON lu.user_id = a.actor_id")
    assert [tuple(r) for r in rows] == [(ids.user_id, ids.project_id, ids.role_id, "UserProject", "alice")]
    stored = await _fetch(keystone_db, "SELECT p.password_hash FROM password p JOIN local_user lu "
                          "ON lu.id = p.local_user_id WHERE lu.user_id = $1", ids.user_id)
    assert stored[0]["password_hash"].startswith("$2b$") and PASSWORD not in stored[0]["password_hash"]

    right, by_id, wrong, nobody = await asyncio.gather(
        keystone_authenticate(keystone_db, "alice", PASSWORD),
        keystone_authenticate(keystone_db, ids.user_id, PASSWORD, by_id=True),
        keystone_authenticate(keystone_db, "alice", PASSWORD + "!"),
        keystone_authenticate(keystone_db, "mallory", PASSWORD))
    assert right, right.reason
    assert right.details["user_id"] == ids.user_id
    assert by_id, by_id.reason
    assert not wrong and "401" in wrong.reason
    assert not nobody and "401" in nobody.reason


async def test_a_token_is_accepted_where_the_keys_and_rows_are_the_same(keystone_db: str, tmp_path: Path) -> None:
    controller_keys, other_keys = await asyncio.gather(keystone_fernet_setup(tmp_path / "controller-keys"),
                                                       keystone_fernet_setup(tmp_path / "other-keys"))
    ids = await keystone_bootstrap(keystone_db, user="alice", password=PASSWORD, project="edge", role="operator",
                                   key_repository=controller_keys)
    token = await keystone_issue_token(keystone_db, controller_keys, "alice", PASSWORD, "edge")
    assert token.startswith("gAAAA")                                 # a Fernet token

    # A copy of the controller's rows (what a sync makes) and a database without them.
    copy = f"roost_test_keystone_copy_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{keystone_db}"')
    finally:
        await admin.close()
    try:
        async with openstack_database("keystone") as empty:
            same, other_repo, copied, no_rows = await asyncio.gather(
                keystone_validate_token(keystone_db, controller_keys, token),
                keystone_validate_token(keystone_db, other_keys, token),
                keystone_validate_token(copy, controller_keys, token),
                keystone_validate_token(empty, controller_keys, token))
    finally:
        await drop_database(copy)
    assert same, same.reason
    assert (same.details["user_id"], same.details["project_id"]) == (ids.user_id, ids.project_id)
    assert "operator" in same.details["roles"] and "reader" in same.details["roles"]   # implied roles too
    assert copied, copied.reason
    assert not other_repo and other_repo.reason
    assert not no_rows and no_rows.reason

    # The same checks in one keystone process (a subcloud's checks in one call), tampered token refused.
    logins, tokens = await keystone_check(keystone_db, logins=[("alice", PASSWORD), ("alice", "wrong")],
                                          tokens=[token, token[:-4] + "AAAA"], repo_dir=controller_keys)
    assert [bool(v) for v in logins] == [True, False]
    assert [bool(v) for v in tokens] == [True, False]
    assert tokens[0].details["user_id"] == ids.user_id

    # Rotation keeps the old primary as a secondary key: the token stays valid; a new token uses the new key.
    await keystone_fernet_rotate(controller_keys)
    assert sorted(p.name for p in controller_keys.iterdir()) == ["0", "1", "2"]
    assert await keystone_validate_token(keystone_db, controller_keys, token)


async def test_glance_image_through_glances_db_api(glance_db: str) -> None:
    image_id = await glance_create_image(
        glance_db, "cirros-0.6", owner="p1", properties={"os_distro": "cirros", "hw_disk_bus": "virtio"},
        tags=["edge", "small"], members=["p2", "p3"],
        locations=[{"url": "file:///var/lib/glance/images/cirros", "metadata": {"store": "file"}}],
        size=21430272, disk_format="qcow2")
    image = await glance_get_image(glance_db, image_id)
    assert image["name"] == "cirros-0.6" and image["owner"] == "p1" and image["status"] == "active"
    assert image["properties"] == {"os_distro": "cirros", "hw_disk_bus": "virtio"}
    assert image["tags"] == ["edge", "small"]
    assert image["members"] == ["p2", "p3"]
    assert image["locations"] == [{"url": "file:///var/lib/glance/images/cirros", "metadata": {"store": "file"}}]
    rows = await _fetch(glance_db, "SELECT id, size, disk_format, visibility FROM images")
    assert [tuple(r) for r in rows] == [(image_id, 21430272, "qcow2", "shared")]
    assert len(await _fetch(glance_db, "SELECT 1 FROM image_properties WHERE image_id = $1", image_id)) == 2
