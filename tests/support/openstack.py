"""Real keystone and glance databases (created by their own migrations) and keystone's own code, for dcsync tests.

keystone 30.0.0 and glance 33.0.0 live in a separate virtualenv (``scripts/openstack-venv.sh``: default
``.venv-openstack`` in the checkout, ``ROOST_OPENSTACK_VENV`` overrides it; pins in
``tests/openstack/constraints.txt``, never in roost's ``.venv``).  ``openstack_venv()`` makes it once per process;
when that fails the test FAILS with pip's output: it never skips.

Databases live on the machine's PostgreSQL (``tests.support.postgres.ADMIN_URL``).  ``keystone-manage db_sync`` and
``glance-manage db_sync`` run once into the template databases ``roost_tmpl_keystone`` and ``roost_tmpl_glance``
(rebuilt when the pins change: the database comment holds their hash, written last, so a half-built template is
rebuilt too), and every new database is a ``CREATE DATABASE … TEMPLATE`` copy of one (a fraction of a second
instead of seconds).  An advisory lock keeps two pytest processes from building a template at the same time (a
build takes it exclusively, a copy shared).

Keystone's operations run its own code in the openstack venv (``tests/openstack/tools/keystone_tool.py``):
``keystone-manage bootstrap`` and ``fernet_setup``/``fernet_rotate``; a password login, a token issue and a token
validation through keystone's own WSGI application (``POST``/``GET /v3/auth/tokens``, in the tool's process through
a werkzeug test client: the real auth plugins, identity and token providers, no server, no port); users, projects,
roles and grants through keystone's managers.  Images through glance's DB API
(``tests/openstack/tools/glance_tool.py``).
Passwords go to the tools on stdin (or, for ``keystone-manage bootstrap``, in ``OS_BOOTSTRAP_PASSWORD``), never in
a command line, and error messages show the tools' stderr, which never holds them.

Each keystone call is a process that imports keystone: about 2 s; a glance call about 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.support.postgres import ADMIN_URL

ROOT = Path(__file__).resolve().parents[2]
OPENSTACK_DIR = ROOT / "tests" / "openstack"
TOOLS_DIR = OPENSTACK_DIR / "tools"
VENV_SCRIPT = ROOT / "scripts" / "openstack-venv.sh"
TEMPLATES: dict[str, str] = {"keystone": "roost_tmpl_keystone", "glance": "roost_tmpl_glance"}
TEMPLATE_LOCK = 0x526F6F73744F5331        # pg advisory lock key ("RoostOS1"): template builds vs copies
VENV_TIMEOUT = 900.0                       # the first install downloads ~130 packages (about 40 s here)
TOOL_TIMEOUT = 120.0

Kind = Literal["keystone", "glance"]


class OpenStackSupportError(RuntimeError):
    """The openstack venv, a template database or a keystone/glance tool failed; the message says how."""


# --------------------------------------------------------------------------------------------------- the venv

_venv_lock = threading.Lock()
_venv: Path | None = None


def openstack_venv() -> Path:
    """The openstack virtualenv (made or brought up to date by scripts/openstack-venv.sh once per process)."""
    global _venv
    with _venv_lock:
        if _venv is None:
            try:
                done = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True,
                                      timeout=VENV_TIMEOUT, check=False)
            except subprocess.TimeoutExpired as exc:
                raise OpenStackSupportError(f"{VENV_SCRIPT} did not finish in {VENV_TIMEOUT:.0f}s") from exc
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                raise OpenStackSupportError(f"{VENV_SCRIPT} failed (exit {done.returncode}); it needs python3 and "
                                            f"PyPI.\n{_tail(done.stderr)}")
            venv = Path(lines[-1])
            for exe in ("python", "keystone-manage", "glance-manage"):
                if not (venv / "bin" / exe).exists():
                    raise OpenStackSupportError(f"{VENV_SCRIPT} made {venv} without bin/{exe}")
            _venv = venv
        return _venv


async def openstack_venv_async() -> Path:
    """``openstack_venv()`` off the event loop (the first install takes a while)."""
    return await asyncio.to_thread(openstack_venv)


def pins_hash() -> str:
    """The hash of requirements.txt + constraints.txt: what the templates were built with."""
    digest = hashlib.sha256()
    for name in ("requirements.txt", "constraints.txt"):
        digest.update((OPENSTACK_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def _write(path: Path, text: str) -> Path:
    """A small config file (a temporary directory's), written synchronously: it takes microseconds."""
    path.write_text(text)
    return path


def _tail(text: str, lines: int = 40) -> str:
    """The end of a tool's stderr, without eventlet's deprecation banner."""
    kept = [line for line in text.splitlines() if line.strip()
            and "eventlet" not in line.lower() and "we recommend" not in line and "framework.  For" not in line]
    return "\n".join(kept[-lines:])


# ------------------------------------------------------------------------------------------------- processes

async def _run(argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None,
               what: str, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a process of the openstack venv; its stdout, or OpenStackSupportError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **(env or {})})
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OpenStackSupportError(f"{what} did not finish in {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise OpenStackSupportError(f"{what} failed (exit {proc.returncode}):\n{_tail(err.decode(errors='replace'))}")
    return out.decode()


async def _tool(tool: str, command: str, request: Mapping[str, Any]) -> dict[str, Any]:
    venv = await openstack_venv_async()
    out = await _run([str(venv / "bin" / "python"), str(TOOLS_DIR / tool), command], stdin=json.dumps(request),
                     what=f"{tool} {command}")
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise OpenStackSupportError(f"{tool} {command} answered no JSON: {out[-2000:]!r}") from None
    if not isinstance(answer, dict):
        raise OpenStackSupportError(f"{tool} {command} answered {answer!r}")
    return answer


# ------------------------------------------------------------------------------------------------- databases

def sqlalchemy_url(db: str) -> str:
    """The SQLAlchemy URL (psycopg2) of database ``db`` on the test PostgreSQL, as keystone and glance want it."""
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(("postgresql+psycopg2", parts.netloc, f"/{db}", parts.query, parts.fragment))


def _quote(name: str) -> str:
    if not name or '"' in name or "\x00" in name or len(name.encode()) > 63:
        raise ValueError(f"not a usable database name: {name!r}")
    return f'"{name}"'


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(ADMIN_URL, timeout=10)
    except Exception as exc:
        raise OpenStackSupportError(f"PostgreSQL is needed and is not reachable at {ADMIN_URL}: "
                                    f"{type(exc).__name__}: {exc}") from exc


async def _template_ready(admin: asyncpg.Connection, template: str, marker: str) -> bool:
    comment = await admin.fetchval("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                                   "WHERE datname = $1", template)
    return bool(comment == marker)


async def ensure_template(kind: Kind) -> str:
    """The template database of ``kind`` (built by ``<kind>-manage db_sync`` when missing or of other pins)."""
    template = TEMPLATES[kind]
    marker = f"roost openstack template, {kind} db_sync, pins {pins_hash()}"
    admin = await _admin()
    try:
        await admin.execute("SELECT pg_advisory_lock_shared($1)", TEMPLATE_LOCK)
        ready = await _template_ready(admin, template, marker)
        await admin.execute("SELECT pg_advisory_unlock_shared($1)", TEMPLATE_LOCK)
        if ready:
            return template
        venv = await openstack_venv_async()
        await admin.execute("SELECT pg_advisory_lock($1)", TEMPLATE_LOCK)
        try:
            if await _template_ready(admin, template, marker):       # another process built it meanwhile
                return template
            await admin.execute(f"DROP DATABASE IF EXISTS {_quote(template)} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {_quote(template)}")
            await _db_sync(venv, kind, template)
            await admin.execute(f"COMMENT ON DATABASE {_quote(template)} IS '{marker}'")
        finally:
            await admin.execute("SELECT pg_advisory_unlock($1)", TEMPLATE_LOCK)
    finally:
        await admin.close()
    return template


async def _db_sync(venv: Path, kind: Kind, db: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"roost-{kind}-") as tmp:
        config = _write(Path(tmp, f"{kind}.conf"), f"[database]\nconnection = {sqlalchemy_url(db)}\n")
        await _run([str(venv / "bin" / f"{kind}-manage"), "--config-file", str(config), "db_sync"],
                   what=f"{kind}-manage db_sync into {db}", timeout=300)


async def create_database(kind: Kind, name: str) -> str:
    """A new database ``name`` with the real ``kind`` schema (a copy of the template); answers ``name``."""
    template = await ensure_template(kind)
    admin = await _admin()
    try:
        await admin.execute("SELECT pg_advisory_lock_shared($1)", TEMPLATE_LOCK)
        try:
            await admin.execute(f"CREATE DATABASE {_quote(name)} TEMPLATE {_quote(template)}")
        finally:
            await admin.execute("SELECT pg_advisory_unlock_shared($1)", TEMPLATE_LOCK)
    finally:
        await admin.close()
    return name


async def create_keystone_database(name: str) -> str:
    """A new database ``name`` with keystone's schema (``keystone-manage db_sync``'s); answers ``name``."""
    return await create_database("keystone", name)


async def create_glance_database(name: str) -> str:
    """A new database ``name`` with glance's schema (``glance-manage db_sync``'s); answers ``name``."""
    return await create_database("glance", name)


async def drop_database(name: str) -> None:
    """Drop database ``name`` if it exists, terminating its connections first (``WITH (FORCE)``)."""
    admin = await _admin()
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def openstack_database(kind: Kind, prefix: str | None = None) -> AsyncIterator[str]:
    """A fresh, uniquely named ``kind`` database for the block; yields its name; dropped afterwards."""
    name = f"{prefix or 'roost_test_' + kind}_{uuid.uuid4().hex[:12]}"
    await create_database(kind, name)
    try:
        yield name
    finally:
        await drop_database(name)


# -------------------------------------------------------------------------------------------------- keystone

@dataclass(frozen=True)
class KeystoneIds:
    """What a bootstrap or a user creation made: the ids as keystone stored them."""

    user_id: str
    project_id: str
    role_id: str
    domain_id: str = "default"


@dataclass(frozen=True)
class Verdict:
    """keystone's answer to a login or a token validation; true when it accepted.  ``reason`` when it refused."""

    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


def _keystone_request(db: str, key_repository: Path | str | None = None, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"connection": sqlalchemy_url(db), **fields}
    if key_repository is not None:
        request["key_repository"] = str(key_repository)
    return request


async def keystone_fernet_setup(repo_dir: Path | str) -> Path:
    """``keystone-manage fernet_setup`` into ``repo_dir`` (created; owned by the current user): keys 0 and 1."""
    return await _fernet("fernet_setup", repo_dir)


async def keystone_fernet_rotate(repo_dir: Path | str) -> Path:
    """``keystone-manage fernet_rotate`` of ``repo_dir``: the staged key becomes primary, a new key is staged."""
    return await _fernet("fernet_rotate", repo_dir)


async def _fernet(command: str, repo_dir: Path | str) -> Path:
    repo = Path(repo_dir)
    venv = await openstack_venv_async()
    with tempfile.TemporaryDirectory(prefix="roost-keystone-") as tmp:
        config = _write(Path(tmp, "keystone.conf"), f"[fernet_tokens]\nkey_repository = {repo}\n")
        await _run([str(venv / "bin" / "keystone-manage"), "--config-file", str(config), command,
                    "--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid())],
                   what=f"keystone-manage {command} {repo}")
    return repo


async def keystone_bootstrap(db: str, *, user: str, password: str, project: str, role: str,
                             key_repository: Path | str | None = None) -> KeystoneIds:
    """``keystone-manage bootstrap`` on database ``db``; the ids it made, read back through keystone.

    Besides user, project, role and the grant of the role to the user on the project, bootstrap makes the
    ``default`` domain, the roles ``reader``, ``member``, ``manager`` and ``service`` with implied roles
    (role → manager → member → reader) and a system grant of the role to the user.  It needs a Fernet key
    repository: a throwaway one is made when none is given.
    """
    venv = await openstack_venv_async()
    with tempfile.TemporaryDirectory(prefix="roost-keystone-") as tmp:
        if key_repository is None:
            key_repository = await keystone_fernet_setup(Path(tmp, "fernet-keys"))
        config = _write(Path(tmp, "keystone.conf"), f"[database]\nconnection = {sqlalchemy_url(db)}\n"
                        f"[fernet_tokens]\nkey_repository = {key_repository}\n"
                        f"[fernet_receipts]\nkey_repository = {key_repository}\n")
        await _run([str(venv / "bin" / "keystone-manage"), "--config-file", str(config), "bootstrap",
                    "--bootstrap-username", user, "--bootstrap-project-name", project,
                    "--bootstrap-role-name", role],
                   env={"OS_BOOTSTRAP_PASSWORD": password}, what=f"keystone-manage bootstrap on {db}")
    return await keystone_lookup(db, user=user, project=project, role=role)


async def keystone_create_user(db: str, *, user: str, password: str, project: str, role: str,
                               domain: str = "default") -> KeystoneIds:
    """Through keystone's managers: project and role (found or created by name), a new user, the grant."""
    answer = await _tool("keystone_tool.py", "create_user", _keystone_request(
        db, user=user, password=password, project=project, role=role, domain=domain))
    return KeystoneIds(answer["user_id"], answer["project_id"], answer["role_id"], answer["domain_id"])


async def keystone_lookup(db: str, *, user: str, project: str, role: str, domain: str = "default") -> KeystoneIds:
    """The ids of a user, a project and a (global) role named so, as keystone reads them from ``db``."""
    answer = await _tool("keystone_tool.py", "lookup", _keystone_request(
        db, user=user, project=project, role=role, domain=domain))
    if not answer.get("role_id"):
        raise OpenStackSupportError(f"keystone database {db} has no role named {role!r}")
    return KeystoneIds(answer["user_id"], answer["project_id"], answer["role_id"], answer["domain_id"])


async def keystone_authenticate(db: str, user: str, password: str, *, domain: str = "default",
                                by_id: bool = False) -> Verdict:
    """A password login of ``user`` (a name in ``domain``, or an id with ``by_id``) through keystone's API on ``db``."""
    who = {"user_id": user} if by_id else {"user": user, "domain": domain}
    answer = await _tool("keystone_tool.py", "authenticate", _keystone_request(db, password=password, **who))
    return Verdict(bool(answer.get("ok")), str(answer.get("reason", "")), answer)


async def keystone_issue_token(db: str, repo_dir: Path | str, user: str, password: str, project: str, *,
                               domain: str = "default") -> str:
    """A project-scoped Fernet token from a password login through keystone's API on ``db``, keys of ``repo_dir``."""
    answer = await _tool("keystone_tool.py", "issue_token", _keystone_request(
        db, repo_dir, user=user, password=password, project=project, domain=domain))
    if not answer.get("ok"):
        raise OpenStackSupportError(f"keystone on {db} issued no token for {user!r} on {project!r}: "
                                    f"{answer.get('reason')}")
    return str(answer["token"])


async def keystone_validate_token(db: str, repo_dir: Path | str, token: str) -> Verdict:
    """keystone's validation of ``token`` (``GET /v3/auth/tokens``) on ``db`` with the keys of ``repo_dir``.

    Accepted: ``details`` holds ``user_id``, ``project_id`` and the ``roles`` (names) the user has there.
    """
    answer = await _tool("keystone_tool.py", "validate_token", _keystone_request(db, repo_dir, token=token))
    return Verdict(bool(answer.get("ok")), str(answer.get("reason", "")), answer)


async def keystone_check(db: str, *, logins: Sequence[tuple[str, str]] = (), tokens: Sequence[str] = (),
                         repo_dir: Path | str | None = None,
                         domain: str = "default") -> tuple[list[Verdict], list[Verdict]]:
    """Several password logins ``(user name, password)`` and token validations on ``db`` in one keystone process.

    The same checks as ``keystone_authenticate`` and ``keystone_validate_token`` (tokens need ``repo_dir``), for
    the price of one (about 2 s instead of 2 s each): one subcloud's checks in one call.
    """
    if tokens and repo_dir is None:
        raise ValueError("validating tokens needs the key repository (repo_dir)")
    answer = await _tool("keystone_tool.py", "check", _keystone_request(
        db, repo_dir, logins=[{"user": user, "password": password, "domain": domain} for user, password in logins],
        tokens=list(tokens)))
    verdicts = [[Verdict(bool(a.get("ok")), str(a.get("reason", "")), a) for a in answer[key]]
                for key in ("logins", "tokens")]
    return verdicts[0], verdicts[1]


# ---------------------------------------------------------------------------------------------------- glance

async def glance_create_image(db: str, name: str, *, properties: Mapping[str, str] | None = None,
                              tags: Sequence[str] = (), members: Sequence[str] = (),
                              locations: Sequence[Mapping[str, Any]] = (), owner: str | None = None,
                              image_id: str | None = None, **columns: Any) -> str:
    """An image through glance's DB API on ``db``: row, properties, tags, members (accepted), locations; its id.

    ``columns``: more ``images`` columns (``visibility`` default ``shared``, ``status`` default ``active``,
    ``disk_format``, ``container_format``, ``size``, ``checksum``, ``min_disk``, ``min_ram``, ``protected``, …).
    """
    request: dict[str, Any] = {"connection": sqlalchemy_url(db), "name": name, "properties": dict(properties or {}),
                               "tags": list(tags), "members": list(members),
                               "locations": [dict(loc) for loc in locations], **columns}
    if owner is not None:
        request["owner"] = owner
    if image_id is not None:
        request["id"] = image_id
    answer = await _tool("glance_tool.py", "create_image", request)
    return str(answer["id"])


async def glance_get_image(db: str, image_id: str) -> dict[str, Any]:
    """The image as glance's DB API reads it from ``db``: its columns, properties, tags, members and locations."""
    answer = await _tool("glance_tool.py", "get_image", {"connection": sqlalchemy_url(db), "id": image_id})
    answer.pop("ok", None)
    return answer
