"""The dcsync REST API (dcmanager's ``/v1.0/subclouds`` shape) in ``create_app`` against an in-test fake of
the service: status codes, bodies, who may do what, and the principal handed to the service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.core.auth import InMemoryAuthenticator
from services.core.http import create_app
from services.dcsync.api import build_router
from tests.support.dcsync_fake import FakeDcsync


class Api:
    def __init__(self, client: httpx.AsyncClient, auth: InMemoryAuthenticator, service: FakeDcsync) -> None:
        self.client, self.service = client, service
        self.admin = {"Authorization": f"Bearer {auth.issue('operator', 'admin')}"}
        self.reader = {"X-Auth-Token": auth.issue('viewer', 'reader')}


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    auth = InMemoryAuthenticator()
    service = FakeDcsync()
    app = create_app("dcsync", authenticator=auth, routers=[build_router(service)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dcsync") as client:
        yield Api(client, auth, service)


async def test_add_list_show_and_the_dcmanager_paths(api: Api) -> None:
    added = await api.client.post("/v1.0/subclouds", json={"name": "edge-1", "description": "rack 4"},
                                  headers=api.admin)
    assert added.status_code == 201, added.text
    assert added.json()["name"] == "edge-1" and added.json()["management"] == "managed"
    assert api.service.calls == [("add", "edge-1", "operator")]
    again = await api.client.post("/v1.0/subclouds", json={"name": "edge-1"}, headers=api.admin)
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    bad = await api.client.post("/v1.0/subclouds", json={"name": "Edge_1"}, headers=api.admin)
    assert bad.status_code == 422

    listed = await api.client.get("/v1.0/subclouds", headers=api.reader)
    assert listed.status_code == 200
    assert [s["name"] for s in listed.json()["subclouds"]] == ["edge-1"]
    for path in ("/v1.0/subclouds/edge-1", "/v1.0/subclouds/edge-1/detail"):
        shown = await api.client.get(path, headers=api.reader)
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert body["description"] == "rack 4"
        assert [(e["endpoint"], e["sync_status"]) for e in body["endpoints"]] == [("identity", "out-of-sync"),
                                                                                   ("image", "in-sync")]
        assert body["skew"] == [{"table": "project", "only_central": ["extra"]}]
    status = await api.client.get("/v1.0/subclouds/edge-1/sync-status", headers=api.reader)
    assert status.status_code == 200
    assert status.json()["endpoints"][0]["head"] == {"main": 9} and set(status.json()) == {"name", "sync",
                                                                                           "endpoints"}
    for path in ("/v1.0/subclouds/nowhere", "/v1.0/subclouds/nowhere/detail", "/v1.0/subclouds/nowhere/sync-status"):
        missing = await api.client.get(path, headers=api.reader)
        assert missing.status_code == 404 and "no subcloud nowhere" in missing.json()["detail"]


async def test_manage_unmanage_delete(api: Api) -> None:
    await api.client.post("/v1.0/subclouds", json={"name": "edge-1"}, headers=api.admin)
    managed = await api.client.delete("/v1.0/subclouds/edge-1", headers=api.admin)
    assert managed.status_code == 409 and "unmanage it first" in managed.json()["detail"]

    off = await api.client.patch("/v1.0/subclouds/edge-1", json={"management-state": "unmanaged"}, headers=api.admin)
    assert off.status_code == 200 and off.json()["management"] == "unmanaged" and off.json()["version"] == 2
    on = await api.client.patch("/v1.0/subclouds/edge-1", json={"management-state": "managed"}, headers=api.admin)
    assert on.status_code == 200 and on.json()["management"] == "managed"
    for body in ({"management-state": "sideways"}, {"description": "x"}, {}):
        refused = await api.client.patch("/v1.0/subclouds/edge-1", json=body, headers=api.admin)
        assert refused.status_code == 422, body
    missing = await api.client.patch("/v1.0/subclouds/nowhere", json={"management-state": "managed"},
                                     headers=api.admin)
    assert missing.status_code == 404

    await api.client.patch("/v1.0/subclouds/edge-1", json={"management-state": "unmanaged"}, headers=api.admin)
    deleted = await api.client.delete("/v1.0/subclouds/edge-1", headers=api.admin)
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await api.client.delete("/v1.0/subclouds/edge-1", headers=api.admin)).status_code == 404
    assert [c[0] for c in api.service.calls] == ["add", "delete", "unmanage", "manage", "manage", "unmanage",
                                                 "delete", "delete"], "a refused body never reaches the service"
    assert {c[2] for c in api.service.calls} == {"operator"}


async def test_audit(api: Api) -> None:
    await api.client.post("/v1.0/subclouds", json={"name": "edge-1"}, headers=api.admin)
    audited = await api.client.post("/v1.0/subclouds/edge-1/audit", headers=api.admin)
    assert audited.status_code == 200
    assert audited.json()["reports"][0]["tables_compared"] == 12
    assert (await api.client.post("/v1.0/subclouds/nowhere/audit", headers=api.admin)).status_code == 404
    api.service.agent_answers = False
    silent = await api.client.post("/v1.0/subclouds/edge-1/audit", headers=api.admin)
    assert silent.status_code == 503 and "did not answer" in silent.json()["detail"]


async def test_readers_read_and_only_admins_act(api: Api) -> None:
    await api.client.post("/v1.0/subclouds", json={"name": "edge-1"}, headers=api.admin)
    for method, path, body in (("POST", "/v1.0/subclouds", {"name": "edge-2"}),
                               ("PATCH", "/v1.0/subclouds/edge-1", {"management-state": "unmanaged"}),
                               ("DELETE", "/v1.0/subclouds/edge-1", None),
                               ("POST", "/v1.0/subclouds/edge-1/audit", None)):
        as_reader = await api.client.request(method, path, json=body, headers=api.reader)
        assert as_reader.status_code == 403, (method, path)
        anonymous = await api.client.request(method, path, json=body)
        assert anonymous.status_code == 401, (method, path)
    assert (await api.client.get("/v1.0/subclouds")).status_code == 401
    assert [c[0] for c in api.service.calls] == ["add"], "nothing refused reached the service"
