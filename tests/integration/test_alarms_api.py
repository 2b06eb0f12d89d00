"""The alarms REST API (StarlingX FM v1 shape) on the real PostgreSQL: the alarms service started on the
in-memory bus, its router in ``create_app``, requests through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.alarms import api as alarms_api
from services.alarms.api import suppression_uuid
from services.alarms.catalogue import ROOST_CATALOGUE
from services.alarms.model import LogRequest, SetRequest
from services.alarms.service import MIGRATIONS, AlarmsService
from services.alarms.store import Origin
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.http import HttpServer, create_app
from services.core.settings import load_settings
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Api:
    def __init__(self, pool: asyncpg.Pool, service: AlarmsService, client: httpx.AsyncClient,
                 admin: str, reader: str, app: FastAPI) -> None:
        self.pool, self.service, self.client, self.app = pool, service, client, app
        self.admin, self.reader = admin, reader

    def auth(self, role: str = "reader") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if role == 'admin' else self.reader}"}

    async def get(self, path: str, params: Any = None, role: str = "reader") -> httpx.Response:
        return await self.client.get(path, params=params, headers=self.auth(role))

    async def raise_(self, alarm_id: str, entity: str, severity: str, reason: str = "",
                     at: datetime | None = None) -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            await self.service.store.set(conn, SetRequest(alarm_id=alarm_id, entity_instance_id=entity,
                                                          severity=severity, reason_text=reason,
                                                          timestamp=at), Origin("roost/inventory"))
        stored = {(s.alarm.alarm_id, s.alarm.entity_instance_id): s
                  for s in await self.service.store.active(self.pool)}
        return str(stored[(alarm_id, entity)].alarm.uuid)

    async def log(self, log_id: str, entity: str, reason: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self.service.store.log(conn, LogRequest(log_id=log_id, entity_instance_id=entity,
                                                          severity="warning", reason_text=reason),
                                         Origin("roost/inventory"))


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with fresh_database() as url, pool_on(url) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('alarms')")
        auth = InMemoryAuthenticator()
        service = AlarmsService([ROOST_CATALOGUE], webhooks=False)
        app = create_app("alarms", authenticator=auth, routers=service.routers())
        bus = Bus(InMemoryTransport(InMemoryBroker()), source="roost/alarms", authenticator=auth)
        await bus.connect()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://alarms") as client:
            not_started = await client.get("/v1/alarms", headers={"X-Auth-Token": auth.issue("early", "reader")})
            assert not_started.status_code == 503
            await service.start(ServiceContext("alarms", load_settings(), pool, bus, Outbox("alarms")))
            try:
                yield Api(pool, service, client, auth.issue("admin-user", "admin"), auth.issue("ops", "reader"), app)
            finally:
                await service.stop()
                await bus.close()


async def test_filters_sorting_and_expand(api: Api) -> None:
    crit = await api.raise_("950.002", "host=compute-1", "critical", "failed", T0)
    major = await api.raise_("950.003", "host=compute-2.network=mgmt", "major", "hb lost", T0 + timedelta(minutes=1))
    minor = await api.raise_("950.006", "host=compute-3", "minor", "auth", T0 + timedelta(minutes=2))

    r = await api.get("/v1/alarms")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"alarms"}
    assert [a["uuid"] for a in body["alarms"]] == [crit, major, minor]
    assert set(body["alarms"][0]) == {"uuid", "alarm_id", "entity_instance_id", "severity", "timestamp",
                                      "reason_text", "suppression_status", "mgmt_affecting", "degrade_affecting"}
    assert body["alarms"][0]["mgmt_affecting"] == "True" and body["alarms"][0]["degrade_affecting"] == "True"

    sev = await api.get("/v1/alarms", {"q.field": "severity", "q.op": "eq", "q.value": "major"})
    assert [a["uuid"] for a in sev.json()["alarms"]] == [major]
    at_least_major = await api.get("/v1/alarms", {"q.field": "severity", "q.op": "ge", "q.value": "major"})
    assert [a["uuid"] for a in at_least_major.json()["alarms"]] == [crit, major]
    two = await api.get("/v1/alarms", [("q.field", "severity"), ("q.op", "ne"), ("q.value", "critical"),
                                       ("q.field", "entity_instance_id"), ("q.op", "eq"),
                                       ("q.value", "host=compute-3"), ("q.type", ""), ("q.type", "")])
    assert [a["uuid"] for a in two.json()["alarms"]] == [minor]
    newer = await api.get("/v1/alarms", {"q.field": "timestamp", "q.op": "gt",
                                         "q.value": (T0 + timedelta(seconds=30)).isoformat()})
    assert {a["uuid"] for a in newer.json()["alarms"]} == {major, minor}
    by_id = await api.get("/v1/alarms", {"q.field": "alarm_id", "q.value": "950.003"})
    assert [a["uuid"] for a in by_id.json()["alarms"]] == [major]

    by_entity = await api.get("/v1/alarms", {"sort_key": "entity_instance_id", "sort_dir": "desc"})
    assert [a["uuid"] for a in by_entity.json()["alarms"]] == [minor, major, crit]

    expanded = await api.get("/v1/alarms", {"expand": "True", "q.field": "uuid", "q.value": crit})
    [item] = expanded.json()["alarms"]
    assert item["alarm_state"] == "set" and item["entity_type_id"] == "host"
    assert item["alarm_type"] == "operational-violation" and item["owner"] == "roost/inventory"
    assert item["masked"] is False and item["version"] == 1 and "created_at" in item


async def test_pagination_with_marker_limit_and_sort(api: Api) -> None:
    uuids = [await api.raise_("950.006", f"host=compute-{i:02d}", "minor", at=T0 + timedelta(minutes=i))
             for i in range(7)]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3, "sort_key": "timestamp", "sort_dir": "asc"}
    pages = 0
    while True:
        r = await api.get("/v1/alarms", params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen.extend(a["uuid"] for a in body["alarms"])
        pages += 1
        if "next" not in body:
            break
        assert body["alarms"] and "marker=" in body["next"]
        params = {**params, "marker": body["alarms"][-1]["uuid"]}
    assert seen == uuids and pages == 3

    follow = await api.client.get(
        (await api.get("/v1/alarms", {"limit": 2, "sort_key": "timestamp", "sort_dir": "desc"})).json()["next"],
        headers=api.auth())
    assert [a["uuid"] for a in follow.json()["alarms"]] == [uuids[4], uuids[3]]

    gone = await api.get("/v1/alarms", {"marker": "00000000-0000-4000-8000-000000000000"})
    assert gone.status_code == 400 and "marker" in gone.json()["detail"]


async def test_operator_suppression_and_hierarchical_masking(api: Api) -> None:
    hb = await api.raise_("950.003", "host=compute-7.network=mgmt", "major")
    failed = await api.raise_("950.002", "host=compute-6", "critical")

    listed = await api.get("/v1/event_suppression")
    assert listed.status_code == 200
    entries = {e["alarm_id"]: e for e in listed.json()["event_suppression"]}
    assert entries["950.003"]["suppression_status"] == "unsuppressed"
    assert entries["950.003"]["uuid"] == suppression_uuid("950.003") and entries["950.003"]["description"]
    assert "950.501" not in entries                                   # a log id is not suppressible

    patch = [{"op": "replace", "path": "/suppression_status", "value": "suppressed"}]
    r = await api.client.patch(f"/v1/event_suppression/{suppression_uuid('950.003')}", json=patch,
                               headers=api.auth("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["suppression_status"] == "suppressed" and r.json()["alarm_id"] == "950.003"
    hidden = await api.get("/v1/alarms")
    assert [a["uuid"] for a in hidden.json()["alarms"]] == [failed]
    shown = await api.get("/v1/alarms", {"include_suppress": "True"})
    assert {a["uuid"]: a["suppression_status"] for a in shown.json()["alarms"]} == {
        failed: "unsuppressed", hb: "suppressed"}
    only = await api.get("/v1/event_suppression", {"q.field": "suppression_status", "q.value": "suppressed"})
    assert [e["alarm_id"] for e in only.json()["event_suppression"]] == ["950.003"]
    summary = await api.get("/v1/alarms/summary")
    assert summary.json() == {"critical": 1, "major": 0, "minor": 0, "warnings": 0, "status": "critical"}
    summary_all = await api.get("/v1/alarms/summary", {"include_suppress": "True"})
    assert summary_all.json()["major"] == 1
    [log] = await api.service.store.history(api.pool, event_log_id="950.502")
    assert log.reason_text == "admin-user: suppressed alarm 950.003: ok"

    r = await api.client.patch("/v1/event_suppression/950.003", json={"suppression_status": "unsuppressed"},
                               headers={"X-Auth-Token": api.admin})
    assert r.status_code == 200 and r.json()["suppression_status"] == "unsuppressed"
    assert len((await api.get("/v1/alarms")).json()["alarms"]) == 2
    by_uuid = await api.get(f"/v1/event_suppression/{suppression_uuid('950.003')}")
    assert by_uuid.json() == {**entries["950.003"], "suppression_status": "unsuppressed"}
    assert (await api.get("/v1/event_suppression/950.003")).json() == by_uuid.json()
    assert (await api.get("/v1/event_suppression/999.999")).status_code == 404

    # host locked (950.001 inhibits) masks the suppressible alarms of host=compute-7 and its children
    locked = await api.raise_("950.001", "host=compute-7", "warning")
    masked = await api.get("/v1/alarms")
    assert {a["uuid"] for a in masked.json()["alarms"]} == {failed, locked}
    everything = await api.get("/v1/alarms", {"include_masked": "True", "expand": "True"})
    assert {a["uuid"]: a["masked"] for a in everything.json()["alarms"]}[hb] is True
    one = await api.get(f"/v1/alarms/{hb}")
    assert one.status_code == 200 and one.json()["masked"] is True
    summary = await api.get("/v1/alarms/summary")
    assert summary.json() == {"critical": 1, "major": 0, "minor": 0, "warnings": 1, "status": "critical"}

    r = await api.client.delete(f"/v1/alarms/{locked}", headers=api.auth("admin"))
    assert r.status_code == 204
    assert {a["uuid"] for a in (await api.get("/v1/alarms")).json()["alarms"]} == {failed, hb}


async def test_delete_clears_and_is_recorded(api: Api) -> None:
    uuid = await api.raise_("950.002", "host=compute-8", "critical")
    shown = await api.get(f"/v1/alarms/{uuid}")
    assert shown.status_code == 200 and shown.json()["entity_instance_id"] == "host=compute-8"

    denied = await api.client.delete(f"/v1/alarms/{uuid}", headers=api.auth("reader"))
    assert denied.status_code == 403
    r = await api.client.delete(f"/v1/alarms/{uuid}", headers={"X-Auth-Token": api.admin})
    assert r.status_code == 204 and r.content == b""
    assert (await api.get(f"/v1/alarms/{uuid}")).status_code == 404
    assert (await api.get("/v1/alarms")).json() == {"alarms": []}
    again = await api.client.delete(f"/v1/alarms/{uuid}", headers=api.auth("admin"))
    assert again.status_code == 404

    events = (await api.get("/v1/event_log", {"expand": "True"})).json()["event_log"]
    assert [(e["state"], e["event_log_id"]) for e in events] == [("log", "950.501"), ("clear", "950.002"),
                                                                 ("set", "950.002")]
    assert events[0]["reason_text"] == "admin-user: cleared alarm 950.002 on host=compute-8: ok"
    assert events[1]["cause"] == "operator" and events[1]["alarm_uuid"] == uuid


async def test_event_log_filters_paging_and_show(api: Api) -> None:
    for i in range(3):
        await api.raise_("950.006", "host=compute-13", "minor", f"reading {i}")
    await api.raise_("950.002", "host=compute-130", "critical")
    await api.log("950.503", "host=compute-13", "admin locked compute-13: ok")

    every = (await api.get("/v1/event_log")).json()["event_log"]
    assert [e["event_log_id"] for e in every] == ["950.503", "950.002", "950.006", "950.006", "950.006"]
    assert set(every[0]) == {"uuid", "event_log_id", "entity_instance_id", "severity", "timestamp",
                             "reason_text", "state", "suppression_status"}
    logs = (await api.get("/v1/event_log", {"logs": "True"})).json()["event_log"]
    assert [e["state"] for e in logs] == ["log"]
    alarms = (await api.get("/v1/event_log", {"alarms": "True"})).json()["event_log"]
    assert {e["state"] for e in alarms} == {"set"} and len(alarms) == 4
    crit = (await api.get("/v1/event_log", {"q.field": "severity", "q.value": "critical"})).json()["event_log"]
    assert [e["entity_instance_id"] for e in crit] == ["host=compute-130"]
    exact = (await api.get("/v1/event_log", {"q.field": "entity_instance_id",
                                             "q.value": "host=compute-13"})).json()["event_log"]
    assert len(exact) == 4
    by_id = (await api.get("/v1/event_log", {"q.field": "event_log_id", "q.value": "950.006"})).json()
    assert len(by_id["event_log"]) == 3
    since = (await api.get("/v1/event_log", {"q.field": "start",
                                             "q.value": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}))
    assert len(since.json()["event_log"]) == 5

    first = (await api.get("/v1/event_log", {"limit": 2, "q.field": "entity_instance_id",
                                             "q.value": "host=compute-13"})).json()
    assert [e["event_log_id"] for e in first["event_log"]] == ["950.503", "950.006"] and "next" in first
    second = (await api.client.get(first["next"], headers=api.auth())).json()
    assert [e["reason_text"] for e in second["event_log"]] == ["reading 1", "reading 0"] and "next" not in second

    one = await api.get(f"/v1/event_log/{every[1]['uuid']}")
    assert one.status_code == 200 and one.json()["event_log_id"] == "950.002"
    assert one.json()["event_log_type"] == "operational-violation"
    missing = await api.get("/v1/event_log/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404

    await api.client.patch("/v1/event_suppression/950.006", json={"suppression_status": "suppressed"},
                           headers=api.auth("admin"))
    hidden = (await api.get("/v1/event_log", {"alarms": "True"})).json()["event_log"]
    assert [e["event_log_id"] for e in hidden] == ["950.002"]
    shown = (await api.get("/v1/event_log", {"alarms": "True", "include_suppress": "True"})).json()["event_log"]
    assert [e["suppression_status"] for e in shown] == ["unsuppressed", "suppressed", "suppressed", "suppressed"]


async def test_authentication(api: Api) -> None:
    assert (await api.client.get("/v1/alarms")).status_code == 401
    bad = await api.client.get("/v1/alarms", headers={"X-Auth-Token": "roost_not-a-real-token"})
    assert bad.status_code == 401 and "roost_not-a-real-token" not in bad.text
    assert (await api.client.get("/v1/alarms", headers={"X-Auth-Token": api.reader})).status_code == 200
    assert (await api.client.get("/v1/alarms/summary", headers=api.auth())).status_code == 200
    patch = await api.client.patch("/v1/event_suppression/950.003", json={"suppression_status": "suppressed"},
                                   headers={"X-Auth-Token": api.reader})
    assert patch.status_code == 403
    no_token = await api.client.delete("/v1/alarms/00000000-0000-4000-8000-000000000000")
    assert no_token.status_code == 401

    schema = (await api.client.get("/openapi.json")).json()
    assert {"/v1/alarms", "/v1/alarms/summary", "/v1/alarms/{alarm_uuid}", "/v1/event_log",
            "/v1/event_log/{event_uuid}", "/v1/event_suppression",
            "/v1/event_suppression/{ident}"} <= set(schema["paths"])
    ok = schema["paths"]["/v1/alarms"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/AlarmCollection"}
    assert {"roostToken", "xAuthToken"} <= set(schema["components"]["securitySchemes"])


SECRET = "s3cr3t-" + "x" * 300


@pytest.mark.parametrize(("path", "params", "code", "reason"), [
    ("/v1/alarms", {"q.field": "severity", "q.value": "catastrophic"}, 400, "not a severity"),
    ("/v1/alarms", {"q.field": "alarm_id", "q.value": "999.999"}, 400, "unknown alarm id"),
    ("/v1/alarms", {"q.field": "alarm_id", "q.value": "9.99.9"}, 400, "not an alarm id"),
    ("/v1/alarms", {"q.field": "entity_instance_id", "q.value": "host"}, 400, "not an entity instance id"),
    ("/v1/alarms", {"q.field": "severity", "q.op": "like", "q.value": "major"}, 400, "q.op must be"),
    ("/v1/alarms", {"q.field": "reason_text", "q.value": "x"}, 400, "q.field must be"),
    ("/v1/alarms", {"q.field": "entity_instance_id", "q.op": "lt", "q.value": "host=a"}, 400, "eq or ne"),
    ("/v1/alarms", {"q.field": "alarm_type", "q.value": SECRET}, 400, "longer than 255"),
    ("/v1/alarms", {"q.field": "severity"}, 400, "same number of times"),
    ("/v1/alarms", {"sort_key": "password"}, 400, "sort_key must be"),
    ("/v1/alarms", {"limit": 0}, 422, ""),
    ("/v1/alarms", {"limit": 2001}, 422, ""),
    ("/v1/alarms", {"marker": "not-a-uuid"}, 400, "not a uuid"),
    ("/v1/alarms/not-a-uuid", None, 400, "not a uuid"),
    (f"/v1/alarms/{SECRET}", None, 400, "longer than 255"),
    ("/v1/alarms/00000000-0000-4000-8000-000000000000", None, 404, "no active alarm"),
    ("/v1/event_log/nonsense", None, 400, "not a uuid"),
    ("/v1/event_log", {"q.field": "start", "q.value": "yesterday"}, 400, "ISO 8601"),
    ("/v1/event_log", {"marker": "00000000-0000-4000-8000-000000000000"}, 400, "marker"),
])
async def test_bad_input_is_a_4xx_with_a_reason(api: Api, path: str, params: dict[str, Any] | None, code: int,
                                                reason: str) -> None:
    r = await api.get(path, params)
    assert r.status_code == code, r.text
    assert reason in str(r.json()["detail"])
    assert "s3cr3t" not in r.text


@pytest.mark.parametrize(("ident", "body", "code", "reason"), [
    ("999.999", {"suppression_status": "suppressed"}, 404, "no alarm id"),
    ("950.501", {"suppression_status": "suppressed"}, 404, "no alarm id"),           # a log, not an alarm
    ("00000000-0000-4000-8000-000000000000", {"suppression_status": "suppressed"}, 404, "no alarm id"),
    ("nonsense", {"suppression_status": "suppressed"}, 400, "not a uuid"),
    ("950.003", {"suppression_status": "hidden"}, 422, ""),
    ("950.003", [{"op": "replace", "path": "/alarm_id", "value": "suppressed"}], 422, ""),
    ("950.003", [], 400, "empty"),
    ("950.003", {"suppression_status": "suppressed", "password": SECRET}, 422, ""),
])
async def test_bad_suppression_patches(api: Api, ident: str, body: Any, code: int, reason: str) -> None:
    r = await api.client.patch(f"/v1/event_suppression/{ident}", json=body, headers=api.auth("admin"))
    assert r.status_code == code, r.text
    assert reason in str(r.json()["detail"])
    assert "s3cr3t" not in r.text


async def test_summary_status_follows_the_worst_severity(api: Api) -> None:
    assert (await api.get("/v1/alarms/summary")).json() == {"critical": 0, "major": 0, "minor": 0, "warnings": 0,
                                                            "status": "OK"}
    await api.raise_("950.006", "host=compute-20", "minor")
    await api.raise_("950.001", "host=compute-21", "warning")
    assert (await api.get("/v1/alarms/summary")).json() == {"critical": 0, "major": 0, "minor": 1, "warnings": 1,
                                                            "status": "degraded"}


GARBAGE = ["", " ", "x", "'; DROP TABLE alarms.active_alarms; --", "\x00", "%", "é" * 10, "9" * 40, "-1",
           "2026-13-45T99:99", "host=", "=x", "host=a..b", "None", "null", "[]", "{}", "ge", "critical "]


async def test_garbage_queries_are_never_a_server_error(api: Api) -> None:
    """Every q field and op with odd values, and odd markers, sort keys and ids: a 2xx or a 4xx, never a 5xx."""
    await api.raise_("950.002", "host=compute-30", "critical")
    fields = {"/v1/alarms": ["uuid", "alarm_id", "alarm_type", "entity_type_id", "entity_instance_id", "severity",
                             "probable_cause", "suppression_status", "timestamp", "created_at", "updated_at"],
              "/v1/event_log": ["uuid", "event_log_id", "entity_type_id", "entity_instance_id", "severity", "state",
                                "event_log_type", "timestamp", "start", "end"],
              "/v1/event_suppression": ["uuid", "alarm_id", "suppression_status"]}
    for path, names in fields.items():
        for field in names:
            for op in ("eq", "ne", "lt", "le", "gt", "ge"):
                for value in GARBAGE:
                    r = await api.get(path, {"q.field": field, "q.op": op, "q.value": value})
                    assert r.status_code < 500, (path, field, op, value, r.text)
        for value in GARBAGE:
            for name in ("marker", "sort_key", "sort_dir", "limit", "include_suppress", "expand"):
                r = await api.get(path, {name: value})
                assert r.status_code < 500, (path, name, value, r.text)
    for value in (quote(v, safe="") for v in GARBAGE[1:]):
        for path in ("/v1/alarms/", "/v1/event_log/", "/v1/event_suppression/"):
            assert (await api.get(path + value)).status_code < 500, (path, value)
        r = await api.client.patch("/v1/event_suppression/" + value, json={"suppression_status": "suppressed"},
                                   headers=api.auth("admin"))
        assert r.status_code < 500, (value, r.text)
        r = await api.client.delete("/v1/alarms/" + value, headers=api.auth("admin"))
        assert r.status_code < 500, (value, r.text)


async def test_over_real_http_with_the_starlingx_header(api: Api) -> None:
    """uvicorn on a free loopback port: what an fmclient sends (X-Auth-Token, q.* parameters) works."""
    uuid = await api.raise_("950.003", "host=controller-0.network=oam", "major", "hb lost on oam")
    server = HttpServer(api.app)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.get("/v1/alarms", params={"q.field": "severity", "q.op": "eq", "q.type": "",
                                                     "q.value": "major"}, headers={"X-Auth-Token": api.reader})
            assert r.status_code == 200 and [a["uuid"] for a in r.json()["alarms"]] == [uuid]
            gone = await http.delete(f"/v1/alarms/{uuid}", headers={"X-Auth-Token": api.admin})
            assert gone.status_code == 204
            assert (await http.get(f"/v1/alarms/{uuid}", headers={"X-Auth-Token": api.reader})).status_code == 404
            assert (await http.get("/v1/alarms")).status_code == 401
    finally:
        await server.stop()


async def test_a_sparse_event_log_filter_reads_a_bounded_slice_per_request(api: Api,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    await api.raise_("950.002", "host=compute-40", "critical")
    for i in range(5):
        await api.log("950.503", f"host=compute-4{i}", f"log {i}")
    monkeypatch.setattr(alarms_api, "SCAN_BATCH", 2)
    monkeypatch.setattr(alarms_api, "SCAN_MAX", 2)
    found: list[str] = []
    pages = 0
    r = await api.get("/v1/event_log", {"q.field": "severity", "q.value": "critical", "limit": 10})
    while True:
        pages += 1
        body = r.json()
        found.extend(e["event_log_id"] for e in body["event_log"])
        if "next" not in body:
            break
        r = await api.client.get(body["next"], headers=api.auth())
    assert found == ["950.002"] and pages >= 3

    [record] = await api.service.store.history(api.pool, event_log_id="950.002")
    only = await api.get("/v1/event_log", {"q.field": "uuid", "q.value": str(record.uuid)})
    assert [e["uuid"] for e in only.json()["event_log"]] == [str(record.uuid)] and "next" not in only.json()
