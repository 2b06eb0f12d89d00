"""Keystone operations with keystone's own code, for roost's tests.  Runs in the openstack venv, never in roost's.

Usage: ``<openstack venv>/bin/python keystone_tool.py COMMAND`` with a JSON object on stdin (passwords travel
there, never in argv) and one JSON object on stdout; keystone's own logging goes to stderr.  Exit status 0 and
``{"ok": true, ...}`` on success; a failed check (wrong password, invalid token) is ``{"ok": false, "reason": ...}``
with status 0 too; anything else is a traceback on stderr and status 1.

Every request carries ``connection`` (an SQLAlchemy URL, ``postgresql+psycopg2://...``) and, for the token
commands, ``key_repository`` (a Fernet key repository made by ``keystone-manage fernet_setup``).

Commands:
  create_user   {user, password, project, role, domain?}: the domain must exist (``default``: created when
                missing, like keystone-manage bootstrap does); project and role are found or created by name;
                the user is created (an error when it exists); then the role is granted to the user on the
                project.  Through keystone's resource, role, identity and assignment managers.
  lookup        {user, project, role, domain?}: the ids of those names.
  authenticate  {user | user_id, password, domain?}: a password login through keystone's own WSGI application
                (``POST /v3/auth/tokens``, unscoped, served in this process by a werkzeug test client: the whole
                real path: auth plugins, identity manager, the SQL driver's password hash check, lockout rules).
  issue_token   {user, password, project, domain?, key_repository}: the same login scoped to the project (keystone
                checks the user has a role there); the Fernet token from ``X-Subject-Token``.
  validate_token {token, key_repository}: ``GET /v3/auth/tokens`` with the token as both ``X-Auth-Token`` and
                ``X-Subject-Token`` (a token may validate itself): decrypts with the key repository, checks expiry,
                revocation events, that user and project exist and are enabled in this database, and the roles
                the user has on the project here.
  check         {logins: [{user | user_id, password, domain?}], tokens: [..], key_repository?}: several logins and
                validations against one database in one process (keystone's import is most of a call's 2 s):
                ``{"logins": [answer of authenticate ...], "tokens": [answer of validate_token ...]}``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from typing import Any


def _configure(request: dict[str, Any]) -> None:
    import keystone.conf
    from keystone.common import sql
    from keystone.server import backends

    conf = keystone.conf.CONF
    keystone.conf.configure()
    sql.initialize()
    conf(args=[], project="keystone", default_config_files=[])
    conf.set_override("connection", request["connection"], group="database")
    repository = request.get("key_repository")
    if repository:
        conf.set_override("key_repository", repository, group="fernet_tokens")
        conf.set_override("key_repository", repository, group="fernet_receipts")
    conf.set_override("provider", "fernet", group="token")
    backends.load_backends()


def _providers() -> Any:
    from keystone.common import provider_api

    return provider_api.ProviderAPIs


def _domain(request: dict[str, Any]) -> str:
    return str(request.get("domain") or "default")


def _role_by_name(name: str) -> dict[str, Any] | None:
    from keystone.common import driver_hints

    hints = driver_hints.Hints()
    hints.add_filter("name", name)
    roles = [r for r in _providers().role_api.list_roles(hints) if r["name"] == name and not r.get("domain_id")]
    return roles[0] if roles else None


def create_user(request: dict[str, Any]) -> dict[str, Any]:
    import uuid

    from keystone import exception

    p = _providers()
    domain_id = _domain(request)
    try:
        p.resource_api.get_domain(domain_id)
    except exception.DomainNotFound:
        if domain_id != "default":
            raise
        p.resource_api.create_domain("default", {"id": "default", "name": "Default", "enabled": True,
                                                 "description": "The default domain"})
    try:
        project = p.resource_api.get_project_by_name(request["project"], domain_id)
    except exception.ProjectNotFound:
        project_id = uuid.uuid4().hex
        project = p.resource_api.create_project(project_id, {"id": project_id, "name": request["project"],
                                                             "domain_id": domain_id, "enabled": True,
                                                             "parent_id": domain_id, "description": ""})
    role = _role_by_name(request["role"])
    if role is None:
        role_id = uuid.uuid4().hex
        role = p.role_api.create_role(role_id, {"id": role_id, "name": request["role"]})
    user = p.identity_api.create_user({"name": request["user"], "domain_id": domain_id, "enabled": True,
                                       "password": request["password"]})
    p.assignment_api.create_grant(role["id"], user_id=user["id"], project_id=project["id"])
    return {"ok": True, "user_id": user["id"], "project_id": project["id"], "role_id": role["id"],
            "domain_id": domain_id}


def lookup(request: dict[str, Any]) -> dict[str, Any]:
    p = _providers()
    domain_id = _domain(request)
    out: dict[str, Any] = {"ok": True, "domain_id": domain_id}
    if request.get("user"):
        out["user_id"] = p.identity_api.get_user_by_name(request["user"], domain_id)["id"]
    if request.get("project"):
        out["project_id"] = p.resource_api.get_project_by_name(request["project"], domain_id)["id"]
    if request.get("role"):
        role = _role_by_name(request["role"])
        out["role_id"] = role["id"] if role else None
    return out


_client: Any = None


def _api(request: dict[str, Any]) -> Any:
    """A werkzeug test client on keystone's own WSGI application (``/v3``, the public API), in this process."""
    global _client
    if _client is None:
        _client = _make_api(request)
    return _client


def _make_api(request: dict[str, Any]) -> Any:
    import os
    import tempfile

    from keystone.server.flask import core
    from werkzeug.test import Client

    lines = ["[DEFAULT]", "insecure_debug = true",   # 401 answers say why (wrong password, no such user)
             "[database]", f"connection = {request['connection']}", "[token]", "provider = fernet"]
    repository = request.get("key_repository")
    if repository:
        lines += ["[fernet_tokens]", f"key_repository = {repository}",
                  "[fernet_receipts]", f"key_repository = {repository}"]
    handle, path = tempfile.mkstemp(prefix="keystone-", suffix=".conf")
    with os.fdopen(handle, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        app = core.initialize_application("public", config_files=[path])
    finally:
        os.unlink(path)
    return Client(app)


def _password_login(request: dict[str, Any], scope: dict[str, Any] | None) -> tuple[int, str | None, Any]:
    user: dict[str, Any] = {"password": request["password"]}
    if request.get("user_id"):
        user["id"] = request["user_id"]
    else:
        user.update(name=request["user"], domain={"id": _domain(request)})
    auth: dict[str, Any] = {"identity": {"methods": ["password"], "password": {"user": user}}}
    if scope is not None:
        auth["scope"] = scope
    response = _api(request).post("/v3/auth/tokens", json={"auth": auth}, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    body = response.get_json(silent=True)
    return response.status_code, response.headers.get("X-Subject-Token"), body


def _failure(status: int, body: Any) -> dict[str, Any]:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return {"ok": False, "status": status, "reason": f"HTTP {status}: {error.get('message', body)}"}


def authenticate(request: dict[str, Any]) -> dict[str, Any]:
    status, _token, body = _password_login(request, None)
    if status != 201:
        return _failure(status, body)
    user = body["token"]["user"]
    return {"ok": True, "user_id": user["id"], "name": user["name"], "domain_id": user["domain"]["id"]}


def issue_token(request: dict[str, Any]) -> dict[str, Any]:
    status, token, body = _password_login(
        request, {"project": {"name": request["project"], "domain": {"id": _domain(request)}}})
    if status != 201 or not token:
        return _failure(status, body)
    return {"ok": True, "token": token, "user_id": body["token"]["user"]["id"],
            "project_id": body["token"]["project"]["id"], "expires_at": body["token"]["expires_at"]}


def check(request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True,
            "logins": [authenticate({**request, **login}) for login in request.get("logins") or []],
            "tokens": [validate_token({**request, "token": token}) for token in request.get("tokens") or []]}


def validate_token(request: dict[str, Any]) -> dict[str, Any]:
    token = request["token"]
    response = _api(request).get("/v3/auth/tokens", headers={"X-Auth-Token": token, "X-Subject-Token": token},
                                 environ_base={"REMOTE_ADDR": "127.0.0.1"})
    body = response.get_json(silent=True)
    if response.status_code != 200:
        return _failure(response.status_code, body)
    data = body["token"]
    return {"ok": True, "user_id": data["user"]["id"], "project_id": (data.get("project") or {}).get("id"),
            "roles": sorted(role["name"] for role in data.get("roles", [])), "expires_at": data["expires_at"],
            "audit_ids": data["audit_ids"]}


MANAGER_COMMANDS = {"create_user", "lookup"}
COMMANDS = {"create_user": create_user, "lookup": lookup, "authenticate": authenticate,
            "issue_token": issue_token, "validate_token": validate_token, "check": check}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: keystone_tool.py {{{'|'.join(COMMANDS)}}} < request.json", file=sys.stderr)
        return 2
    command = sys.argv[1]
    request = json.load(sys.stdin)
    del sys.argv[1:]                   # oslo.config parses sys.argv when keystone's application starts
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):    # whatever keystone prints stays off the JSON answer
            if command in MANAGER_COMMANDS:
                _configure(request)
            answer = COMMANDS[command](request)
    except Exception:
        traceback.print_exc()
        return 1
    out.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
