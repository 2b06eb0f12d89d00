"""A fake of the dcsync service's operator side (the methods ``services.dcsync.api`` calls, and the
``roost.cmd.subcloud.*`` commands on a bus), on a dict: for testing the REST API and the `roost subcloud`
command without the service."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

from schemas import dcsync as msg
from schemas.envelope import Principal
from services.core.bus.bus import Message, Reject
from services.dcsync.errors import Conflict, NotFound, Unavailable

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


class FakeDcsync:
    """The service's methods the router calls, on a dict."""

    def __init__(self) -> None:
        self.subclouds: dict[str, msg.SubcloudView] = {}
        self.calls: list[tuple[str, str, str | None]] = []      # (method, name, principal)
        self.agent_answers = True

    def _get(self, name: str) -> msg.SubcloudView:
        try:
            return self.subclouds[name]
        except KeyError:
            raise NotFound(f"no subcloud {name}") from None

    def _set(self, name: str, **changes: object) -> msg.SubcloudView:
        old = self._get(name)
        view = old.model_copy(update={**changes, "version": old.version + 1})
        self.subclouds[name] = view
        return view

    async def add(self, data: msg.SubcloudAdd, principal: Principal | None) -> msg.SubcloudView:
        self.calls.append(("add", data.name, principal.name if principal else None))
        if data.name in self.subclouds:
            raise Conflict(f"subcloud {data.name} exists")
        view = msg.SubcloudView(name=data.name, description=data.description,
                                management="managed" if data.managed else "unmanaged", availability="unknown",
                                join_state="joining", join_policy=data.join_policy or "refuse",
                                sync={"identity": "unknown", "image": "unknown"}, created_at=T0, version=1)
        self.subclouds[data.name] = view
        return view

    async def delete(self, name: str, principal: Principal | None) -> msg.SubcloudDeleted:
        self.calls.append(("delete", name, principal.name if principal else None))
        if self._get(name).management == "managed":
            raise Conflict(f"subcloud {name} is managed: unmanage it first")
        del self.subclouds[name]
        return msg.SubcloudDeleted(name=name)

    async def manage(self, name: str, principal: Principal | None) -> msg.SubcloudView:
        self.calls.append(("manage", name, principal.name if principal else None))
        return self._set(name, management="managed")

    async def unmanage(self, name: str, principal: Principal | None) -> msg.SubcloudView:
        self.calls.append(("unmanage", name, principal.name if principal else None))
        return self._set(name, management="unmanaged")

    async def list(self) -> msg.SubcloudList:
        return msg.SubcloudList(subclouds=sorted(self.subclouds.values(), key=lambda v: v.name))

    async def show(self, name: str) -> msg.SubcloudDetail:
        view = self._get(name)
        endpoints = [msg.EndpointView(endpoint="identity", sync_status="out-of-sync", cursors={"main": 7},
                                      head={"main": 9}, out_of_sync_since=T0, detail="2 changes to apply"),
                     msg.EndpointView(endpoint="image", sync_status="in-sync", cursors={"main": 3}, head={"main": 3})]
        return msg.SubcloudDetail(**view.model_dump(), endpoints=endpoints,
                                  skew=[{"table": "project", "only_central": ["extra"]}])

    async def audit(self, name: str) -> msg.AuditResult:
        self._get(name)
        if not self.agent_answers:
            raise Unavailable(f"subcloud {name}'s agent did not answer")
        return msg.AuditResult(reports=[msg.AuditReport(subcloud=name, endpoint="identity", clean=True,
                                                         tables_compared=12, started_at=T0, seconds=0.5)])

    async def command(self, message: Message) -> BaseModel:
        """``roost.cmd.subcloud.*`` as the service serves them."""
        data, verb = message.data, message.envelope.type.rsplit(".", 1)[-1]
        if isinstance(data, msg.SubcloudAdd):
            return await self.add(data, message.principal)
        if isinstance(data, msg.SubcloudListQuery):
            return await self.list()
        name = getattr(data, "name", "")
        if verb == "delete":
            return await self.delete(name, message.principal)
        if verb in ("manage", "unmanage"):
            return await (self.manage if verb == "manage" else self.unmanage)(name, message.principal)
        if verb == "show":
            return await self.show(name)
        if verb == "audit":
            return await self.audit(name)
        raise Reject(f"the fake does not serve {message.envelope.type}")
