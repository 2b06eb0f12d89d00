"""The inventory service: host records, their states and hardware, the host agents, the BMCs.

Every change of a host goes through one path (``_transition``): in ONE transaction, under the site lock
(a row lock on ``inventory.site``, so replicas decide one at a time), it reads every host, asks the pure
state machine (``machine.decide`` for an operator command, ``machine.apply`` for a fact), writes the
changed hosts, their ``roost.host.*`` events, the alarms they raise or clear (``faults``) and, for an
operator command, its customer log, all through the outbox.  Only after the commit does it carry out the
machine's effects (disable services, run the in-test checks, a BMC action, a swact request), whose
outcomes come back through the same path as facts.

Commands (``roost.cmd.host.*``, group ``inventory``, several at once: a lock waits for the orchestrator)
answer with the host as it is after the command, or are rejected with the reason and change nothing.

Lock asks the orchestrator (``roost.cmd.hostservices.disable``) and waits up to ``lock_timeout``; with
no orchestrator running, the lock proceeds and the reply says so; a force-lock does not wait.  Unlock
puts the host in ``intest``; the in-test check passes once the host's agent is alive (at once when it
is, or when it next announces itself, within ``go_enabled_timeout``).  Swact is carried out by the
heartbeat service (``roost.cmd.heartbeat.swact``), which then announces the active controller.

Facts consumed (group ``inventory``): agent hellos and hardware reports (an unknown agent becomes an
unprovisioned host), degrade reasons from any service, the heartbeat service's host health and active
controller.  An agent silent for three of its intervals is offline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg
import structlog
from fastapi import APIRouter
from pydantic import BaseModel

from schemas import heartbeat as hb
from schemas import inventory as msg
from schemas import orchestrator as orch
from schemas.envelope import Envelope
from services.core.bus.abc import RequestTimeout
from services.core.bus.bus import Message, Reject, is_unhandled
from services.core.db.inbox import Inbox
from services.core.db.pool import AnyConnection
from services.core.host import ServiceContext
from services.core.secrets import SecretStore
from services.core.versions import advance
from services.inventory import faults, machine, metrics, store
from services.inventory.bmc import audit
from services.inventory.bmc.abc import BmcActionName, BmcError, BmcFactory
from services.inventory.bmc.audit import AuditResult
from services.inventory.bmc.vault import FencingSealer, PasswordVault, VaultError
from services.inventory.bmcs import BmcManager
from services.inventory.machine import Accepted, Refused
from services.inventory.store import DuplicateHost, HostRow, Snapshot

log = structlog.get_logger("roost.inventory")

NAME = "inventory"
GROUP = "inventory"
COMMANDS = "roost.cmd.host.>"
EVENT_PATTERNS = ("roost.agent.>", "roost.degrade.>", "roost.heartbeat.host_health",
                  "roost.heartbeat.active_controller")
INBOX_CONSUMER = "inventory-facts"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
AGENT_SILENT_INTERVALS = 3
_AUDIT_LOCK = 0x696E76626D63   # "invbmc": one BMC audit round at a time across replicas
NAMED_HOSTS = ("controller", "storage")

_VERBS = {"roost.cmd.host.add": "add", "roost.cmd.host.update": "update", "roost.cmd.host.lock": "lock",
          "roost.cmd.host.unlock": "unlock", "roost.cmd.host.reboot": "reboot",
          "roost.cmd.host.reset": "reset", "roost.cmd.host.power_on": "power-on",
          "roost.cmd.host.power_off": "power-off", "roost.cmd.host.reinstall": "reinstall",
          "roost.cmd.host.swact": "swact", "roost.cmd.host.delete": "delete"}


class HostNotFound(LookupError):
    def __str__(self) -> str:
        return f"no host {self.args[0]!r}"


class HostCommandRefused(ValueError):
    """A command the current state or the input does not allow; nothing changed."""


@dataclass
class Outcome:
    """What ``_transition`` did."""

    accepted: bool
    reason: str = ""
    row: HostRow | None = None
    effects: tuple[machine.Effect, ...] = ()
    detail: str = ""
    snapshot: Snapshot | None = None


@dataclass
class _Waiters:
    """Hosts in intest waiting for their agent to prove it is alive."""

    events: dict[str, asyncio.Event] = field(default_factory=dict)

    def wake(self, uuid: str) -> None:
        if uuid in self.events:
            self.events[uuid].set()


def _uuid(row: HostRow | None) -> str:
    """The uuid of the host a fact names (``_transition`` raised HostNotFound if there is none)."""
    assert row is not None
    return row.uuid


def _now() -> datetime:
    return datetime.now(UTC)


def _who(envelope: Envelope) -> str:
    return envelope.principal.name if envelope.principal is not None else envelope.source


class InventoryService:
    """The ``inventory`` component."""

    name = NAME
    migrations: Path | None = MIGRATIONS

    def __init__(self, *, lock_timeout: float = 120.0, go_enabled_timeout: float = 60.0,
                 agent_check_interval: float = 5.0, bmc_audit_interval: float = 60.0,
                 power_wait: float = 30.0, metrics_interval: float = 10.0, secrets: SecretStore | None = None,
                 bmc_factory: BmcFactory | None = None, bmc_request_timeout: float = 5.0,
                 failed_host_recovery: Literal["none", "reset"] | None = None) -> None:
        self.metrics_interval = metrics_interval
        self.failed_host_recovery = failed_host_recovery
        self.policy = machine.Policy()
        self.secrets = secrets
        self.bmc_factory = bmc_factory
        self.bmc_request_timeout = bmc_request_timeout
        self._bmcs: BmcManager | None = None
        self._audit_previous: dict[str, AuditResult] = {}
        self._bmc_hardware_read: set[str] = set()
        self.lock_timeout = lock_timeout
        self.go_enabled_timeout = go_enabled_timeout
        self.agent_check_interval = agent_check_interval
        self.bmc_audit_interval = bmc_audit_interval
        self.power_wait = power_wait
        self._ctx: ServiceContext | None = None
        self._inbox = Inbox(NAME)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._waiters = _Waiters()
        self._router: APIRouter | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("the inventory service has not started")
        return self._ctx

    @property
    def pool(self) -> asyncpg.Pool:
        return self.ctx.pool

    @property
    def bmcs(self) -> BmcManager:
        if self._bmcs is None:
            raise RuntimeError("the inventory service has not started")
        return self._bmcs

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        recovery = self.failed_host_recovery or ctx.settings.failed_host_recovery
        self.policy = machine.Policy(reset_failed_hosts=recovery == "reset")
        secrets = self.secrets or SecretStore.in_data_dir(ctx.settings.data_dir)
        self._bmcs = BmcManager(PasswordVault.from_store(secrets), FencingSealer.from_store(secrets),
                                self.bmc_factory, request_timeout=self.bmc_request_timeout)
        await self._recover()
        await self.reassert_alarms()
        from services.core.bus.abc import ConsumerOptions
        commands = ConsumerOptions(concurrency=16, ack_wait=self.lock_timeout + 60.0)
        await ctx.bus.serve(COMMANDS, GROUP, self.command, options=commands)
        for pattern in EVENT_PATTERNS:
            await ctx.bus.subscribe(pattern, GROUP, self.handle)
        self._loops = [asyncio.create_task(self._watch_agents(), name="inventory-agent-liveness"),
                       asyncio.create_task(self._gauge(), name="inventory-hosts-gauge"),
                       asyncio.create_task(self._audit_loop(), name="inventory-bmc-audit")]

    async def stop(self) -> None:
        loops, self._loops = self._loops, []
        for task in [*loops, *self._tasks]:
            task.cancel()
        for task in [*loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._bmcs is not None:
            await self._bmcs.close()

    def routers(self) -> Sequence[APIRouter]:
        if self._router is None:
            from services.inventory.api import build_router
            self._router = build_router(self)
        return [self._router]

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("inventory background task failed", task=task.get_name(), error=str(task.exception()))

    async def _recover(self) -> None:
        """Actions a previous instance left half done: a lock fails, a test restarts, a power action ends."""
        snap = await store.read_snapshot(self.pool)
        for row in snap.rows.values():
            event: machine.Event | None = None
            if row.action in ("lock", "force-lock"):
                event = machine.ServicesDisableFailed(row.uuid, "inventory restarted during the lock")
            elif row.action in ("reboot", "reset", "power-on", "power-off", "reinstall"):
                event = machine.ActionFailed(row.uuid, "inventory restarted during the action")
            if event is not None:
                await self._fact(event, cause="restart recovery")
            if row.availability == "intest":
                self._spawn(self._go_enabled(row.uuid), f"go-enabled-{row.uuid}")

    async def reassert_alarms(self) -> None:
        """Send the whole set of alarms inventory owns, so that those that no longer stand are cleared."""
        snap = await store.read_snapshot(self.pool)
        alarms = [c.data for row in snap.rows.values() for c in faults.host_alarms(row.state())]
        for row in snap.rows.values():
            if row.bmc_provisioned and row.bmc_outcome in ("unreachable", "auth-failed"):
                known = audit.AuditResult(host_uuid=row.uuid, hostname=row.hostname or row.uuid,
                                          address=row.bmc_address, outcome=row.bmc_outcome,  # type: ignore[arg-type]
                                          message=row.bmc_last_error or "")
                alarms += [alarm.payload() for alarm in audit.decide(known).sets]
        async with self.pool.acquire() as conn, conn.transaction():
            await self.ctx.outbox.add(conn, self.ctx.bus.envelope("roost.fault.reassert", {"alarms": alarms}))

    # -- the one path of every change -----------------------------------------------------------------

    async def _transition(self, ref: str | None,
                          build: Callable[[Snapshot, HostRow | None], machine.Command | machine.Event | None],
                          *, cause: str, origin: Envelope | None = None, verb: str | None = None,
                          reason_texts: dict[str, str] | None = None, conn: AnyConnection | None = None,
                          before_commit: Callable[[AnyConnection, Snapshot], Awaitable[None]] | None = None) -> Outcome:
        """Decide ``build(site, host)`` (the host named by ``ref``; None for a fact about the site) and persist it,
        in ``conn``'s transaction when given (the caller commits), else in one of its own.  ``build`` may
        return None: nothing to do, nothing written."""
        if conn is None:
            async with self.pool.acquire() as own, own.transaction():
                return await self._transition(ref, build, cause=cause, origin=origin, verb=verb,
                                              reason_texts=reason_texts, conn=own, before_commit=before_commit)
        snap = await store.lock_site(conn)
        row = snap.find(ref) if ref is not None else None
        if ref is not None and row is None:
            raise HostNotFound(ref)
        item = build(snap, row)
        if item is None:
            return Outcome(False, "", row, snapshot=snap)
        decision = (machine.decide(snap.site, item) if isinstance(item, machine.Command)
                    else machine.apply(snap.site, item, self.policy))
        if isinstance(decision, Refused):
            if origin is not None and verb is not None and row is not None:
                await self._log(conn, origin, verb, row, f"rejected: {decision.reason}")
            return Outcome(False, decision.reason, row, snapshot=snap)
        rows = await self._persist(conn, snap, decision, cause=cause, origin=origin, reason_texts=reason_texts)
        if before_commit is not None:
            await before_commit(conn, snap)
        if origin is not None and verb is not None and row is not None:
            await self._log(conn, origin, verb, row, f"accepted{': ' + decision.detail if decision.detail else ''}")
        return Outcome(True, "", rows.get(row.uuid) if row is not None else None, decision.effects, decision.detail,
                       snap)

    async def _persist(self, conn: AnyConnection, snap: Snapshot, decision: Accepted, *, cause: str,
                       origin: Envelope | None, reason_texts: dict[str, str] | None) -> dict[str, HostRow]:
        site = decision.site
        saved: dict[str, HostRow] = {}
        active = site.active
        for uuid, old in snap.rows.items():
            new_state = site.host(uuid)
            if new_state is None:
                await store.delete(conn, uuid)
                await self._event(conn, "roost.host.deleted", msg.HostDeleted(
                    entity_id=uuid, version=old.version + 1, hostname=old.hostname, personality=old.personality),
                    origin)
                continue
            if new_state == old.state():
                continue
            new = await store.save(conn, old.with_state(new_state, reason_texts))
            saved[uuid] = new
            view = new.view(active=uuid == active)
            if (old.administrative, old.operational, old.availability, old.task) != (
                    new.administrative, new.operational, new.availability, new.task):
                await self._event(conn, "roost.host.state_changed", msg.HostStateChanged(
                    entity_id=uuid, version=new.version, host=view, cause=cause[:255],
                    previous=msg.StateChange(administrative=old.administrative, operational=old.operational,
                                             availability=old.availability, task=old.task)), origin)
            else:
                await self._event(conn, "roost.host.updated", msg.HostEvent(entity_id=uuid, version=new.version,
                                                                            host=view), origin)
            for change in faults.transition(old.state(), new_state):
                await self._fault(conn, change, origin)
        if active != snap.active:
            await store.set_active(conn, active, snap.active_epoch)
        return saved

    async def _event(self, conn: AnyConnection, type: str, data: BaseModel | dict[str, Any],
                     origin: Envelope | None) -> None:
        attrs: dict[str, Any] = {}
        if origin is not None:
            attrs = {"causationid": origin.id, "correlationid": origin.correlationid or origin.id}
        await self.ctx.outbox.add(conn, self.ctx.bus.envelope(type, data, **attrs))

    async def _fault(self, conn: AnyConnection, change: faults.FaultChange, origin: Envelope | None) -> None:
        await self._event(conn, change.type, change.data, origin)

    async def _log(self, conn: AnyConnection, origin: Envelope, verb: str, row: HostRow, result: str) -> None:
        await self._fault(conn, faults.command_log(_who(origin), verb, row.hostname, row.uuid, result), origin)

    async def _fact(self, event: machine.Event, *, cause: str, reason_texts: dict[str, str] | None = None) -> Outcome:
        """Fold a fact about one host into the site and carry out what follows."""
        assert event.uuid is not None, "ActiveChanged, a fact about the site, goes through _active_controller"
        outcome = await self._transition(event.uuid, lambda _s, _r: event, cause=cause, reason_texts=reason_texts)
        await self._carry_out(outcome.effects)
        return outcome

    # -- effects --------------------------------------------------------------------------------------

    async def _carry_out(self, effects: Sequence[machine.Effect]) -> list[str]:
        details: list[str] = []
        for effect in effects:
            if isinstance(effect, machine.DisableServices):
                details.append(await self._disable_services(effect.uuid, effect.force))
            elif isinstance(effect, machine.EnableServices):
                self._spawn(self._enable_services(effect.uuid), f"enable-services-{effect.uuid}")
            elif isinstance(effect, machine.StartGoEnabled):
                self._spawn(self._go_enabled(effect.uuid), f"go-enabled-{effect.uuid}")
            elif isinstance(effect, machine.BmcAction):
                self._spawn(self._bmc_action(effect.uuid, effect.action), f"bmc-{effect.action}-{effect.uuid}")
            elif isinstance(effect, machine.RequestSwact):
                raise AssertionError("swact is requested by _swact, never through a committed transition")
        return [d for d in details if d]

    async def _host_services(self, type: str, uuid: str, action: Literal["lock", "force-lock", "unlock"],
                             timeout: float) -> tuple[bool | None, str]:
        """Ask the orchestrator: (True, detail) done, (False, why) failed, (None, detail) no orchestrator."""
        snap = await store.read_snapshot(self.pool)
        row = snap.rows.get(uuid)
        if row is None or row.hostname is None:
            return None, "host has no hostname: no services to disable"
        request = self.ctx.bus.envelope(type, orch.HostServices(uuid=uuid, hostname=row.hostname,
                                                                action=action))
        try:
            reply = await self.ctx.bus.request(request, timeout=timeout)
        except RequestTimeout:
            return False, f"the orchestrator did not answer within {timeout:g} s"
        if is_unhandled(reply):
            return None, "no orchestrator is configured: services were not disabled"
        if not reply.ok:
            return False, reply.reason or "the orchestrator refused"
        result = orch.HostServicesResult.model_validate(reply.result)
        return (True, result.detail) if result.done else (False, result.detail or "services not disabled")

    async def _disable_services(self, uuid: str, force: bool) -> str:
        if force:
            # A force-lock does not wait; the orchestrator still hears of it.
            self._spawn(self._host_services("roost.cmd.hostservices.disable", uuid, "force-lock",
                                            self.lock_timeout), f"force-disable-{uuid}")
            await self._fact(machine.ServicesDisabled(uuid), cause="force-lock")
            return "force-lock: did not wait for services to be disabled"
        done, detail = await self._host_services("roost.cmd.hostservices.disable", uuid, "lock", self.lock_timeout)
        if done is False:
            await self._fact(machine.ServicesDisableFailed(uuid, detail), cause="services disable failed")
            return f"lock failed: {detail}"
        await self._fact(machine.ServicesDisabled(uuid), cause="services disabled")
        return detail

    async def _enable_services(self, uuid: str) -> None:
        done, detail = await self._host_services("roost.cmd.hostservices.enable", uuid, "unlock", self.lock_timeout)
        if done is False:
            log.warning("services not enabled after unlock", host=uuid, reason=detail)

    async def _go_enabled(self, uuid: str) -> None:
        """The in-test check: the host's agent is alive (now, or within ``go_enabled_timeout``)."""
        event = self._waiters.events.setdefault(uuid, asyncio.Event())
        try:
            row = (await store.read_snapshot(self.pool)).rows.get(uuid)
            if row is None or row.availability != "intest":
                return
            if not self._agent_alive(row):
                try:
                    await asyncio.wait_for(event.wait(), self.go_enabled_timeout)
                except TimeoutError:
                    await self._fact(machine.GoEnabled(uuid, False, f"its agent did not answer within "
                                                                    f"{self.go_enabled_timeout:g} s"),
                                     cause="in-test failed")
                    return
            await self._fact(machine.GoEnabled(uuid, True), cause="in-test passed")
        finally:
            self._waiters.events.pop(uuid, None)

    def _agent_alive(self, row: HostRow) -> bool:
        if row.agent_seen_at is None:
            return False
        silent = timedelta(seconds=(row.agent_interval or 30.0) * AGENT_SILENT_INTERVALS)
        return _now() - row.agent_seen_at <= silent

    async def _bmc_action(self, uuid: str, action: str) -> None:
        """Carry out a power action on the host's BMC; its outcome comes back as facts."""
        row = (await store.read_snapshot(self.pool)).rows.get(uuid)
        if row is None:
            return
        name: BmcActionName
        if action not in ("power-on", "power-off", "reset", "reboot", "reinstall"):
            await self._fact(machine.ActionFailed(uuid, f"unknown BMC action {action}"), cause=f"bmc {action}")
            return
        name = action  # type: ignore[assignment]
        try:
            report = await self.bmcs.perform(row, name, wait=self.power_wait)
        except (BmcError, VaultError, TimeoutError) as exc:
            log.warning("bmc action failed", host=row.hostname or uuid, action=action, reason=str(exc))
            await self._fact(machine.ActionFailed(uuid, f"BMC {action} failed: {exc}"), cause=f"bmc {action} failed")
            return
        log.info("bmc action done", host=row.hostname or uuid, action=action, sent=list(report.sent),
                 power=report.power_state)
        await self._fact(machine.PowerObserved(uuid, report.power_state), cause=f"bmc {action}: power "
                                                                                  f"{report.power_state}")
        await self._fact(machine.ActionDone(uuid), cause=f"bmc {action} done ({', '.join(report.sent)})")

    async def audit_bmcs(self) -> None:
        """One round of the BMC reachability and credential audit: alarms raised and cleared, each host's
        verdict recorded, and the power state the BMC reports folded in."""
        snap = await store.read_snapshot(self.pool)
        rows = [r for r in snap.rows.values() if r.bmc_provisioned]
        results = await self.bmcs.audit(rows)
        decisions, self._audit_previous = audit.decide_all(results, self._audit_previous)
        async with self.pool.acquire() as conn, conn.transaction():
            current = await store.lock_site(conn)
            for result in results:
                row = current.rows.get(result.host_uuid)
                if row is None:
                    continue
                last_error = None if result.reachable else (result.message or result.outcome)[:255]
                if (row.bmc_reachable, row.bmc_outcome, row.bmc_last_error) != (
                        result.reachable, result.outcome, last_error):
                    saved = await store.save(conn, replace(row, bmc_reachable=result.reachable,
                                                            bmc_outcome=result.outcome, bmc_last_error=last_error))
                    await self._event(conn, "roost.host.updated", msg.HostEvent(
                        entity_id=saved.uuid, version=saved.version,
                        host=saved.view(active=saved.uuid == current.active)), None)
            for decision in decisions.values():
                for type, data in decision.payloads():
                    await self._fault(conn, faults.FaultChange(type, data), None)
        for result in results:
            if result.reachable and result.host_uuid not in self._bmc_hardware_read:
                await self._read_bmc_hardware(snap.rows[result.host_uuid])
        for result in results:
            row = snap.rows[result.host_uuid]
            if result.system is not None and result.system.power_state != row.power_state:
                await self._fact(machine.PowerObserved(row.uuid, result.system.power_state),
                                 cause=f"bmc audit: power {result.system.power_state}")

    async def _read_bmc_hardware(self, row: HostRow) -> None:
        """What the BMC says of the host's hardware (once per BMC and service start): it completes what the
        agent reports (``store.hardware``)."""
        bmc = await self.bmcs.bmc(row)
        if bmc is None:
            return
        try:
            hardware = await bmc.hardware()
        except BmcError as exc:
            log.info("bmc hardware not read", host=row.hostname or row.uuid, reason=str(exc))
            return
        self._bmc_hardware_read.add(row.uuid)
        async with self.pool.acquire() as conn, conn.transaction():
            if await store.put_hardware(conn, row.uuid, hardware.model_copy(update={"source": "redfish"})):
                merged = await store.hardware(conn, row.uuid)
                version = await store.bump(conn, row.uuid)
                if version is not None:
                    await self._event(conn, "roost.host.inventory_updated", msg.HostInventoryUpdated(
                        entity_id=row.uuid, version=int(version), hostname=row.hostname, hardware=merged), None)

    async def _audit_loop(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _AUDIT_LOCK):
                        try:
                            await self.audit_bmcs()
                        finally:
                            await conn.execute("SELECT pg_advisory_unlock($1)", _AUDIT_LOCK)
            except (asyncpg.PostgresError, OSError, VaultError) as exc:
                log.warning("bmc audit round failed; will retry", error=str(exc))
            await asyncio.sleep(self.bmc_audit_interval)

    async def _swact(self, ref: str, force: bool, envelope: Envelope) -> msg.HostActionResult:
        """Swact: the rules are checked here, the heartbeat service carries it out and then announces the
        active controller (``roost.heartbeat.active_controller``), which is when inventory records it.  A
        refused or failed swact changes nothing here."""
        snap = await store.read_snapshot(self.pool)
        row = snap.find(ref)
        if row is None:
            raise HostNotFound(ref)
        verb = "swact --force" if force else "swact"
        decision = machine.decide(snap.site, machine.Swact(row.uuid, force))
        problem = decision.reason if isinstance(decision, Refused) else None
        detail = ""
        if isinstance(decision, Accepted):
            [effect] = [e for e in decision.effects if isinstance(e, machine.RequestSwact)]
            peer = snap.rows[effect.to_uuid]
            assert row.hostname is not None and peer.hostname is not None
            request = self.ctx.bus.envelope("roost.cmd.heartbeat.swact", hb.Swact(
                from_host=row.hostname, to_host=peer.hostname, force=force),
                causationid=envelope.id, correlationid=envelope.correlationid or envelope.id)
            try:
                reply = await self.ctx.bus.request(request, timeout=self.lock_timeout)
                problem = ("no heartbeat service is running to carry out the swact" if is_unhandled(reply)
                           else None if reply.ok else reply.reason or "the heartbeat service refused")
            except RequestTimeout:
                problem = f"the heartbeat service did not answer within {self.lock_timeout:g} s"
            detail = f"the heartbeat service moves the active role to {peer.hostname}"
        async with self.pool.acquire() as conn, conn.transaction():
            await self._log(conn, envelope, verb, row, f"rejected: {problem}" if problem else f"accepted: {detail}")
        if problem is not None:
            raise HostCommandRefused(problem)
        return msg.HostActionResult(host=await self.show(row.uuid), detail=detail)

    # -- commands -------------------------------------------------------------------------------------

    async def command(self, message: Message) -> BaseModel:
        try:
            return await self.execute(message.data, message.envelope)
        except (HostNotFound, HostCommandRefused, DuplicateHost) as exc:
            raise Reject(str(exc)) from None

    async def execute(self, data: BaseModel, envelope: Envelope) -> BaseModel:
        """Run one ``roost.cmd.host.*`` command (from the bus or the REST API).

        Raises ``HostNotFound``, ``HostCommandRefused`` or ``DuplicateHost`` with the reason; nothing
        changed then."""
        verb = _VERBS.get(envelope.type, "")
        try:
            result = await self._execute(data, envelope)
        except (HostNotFound, HostCommandRefused, DuplicateHost):
            metrics.record_command(verb, False)
            raise
        metrics.record_command(verb, True)
        return result

    async def _execute(self, data: BaseModel, envelope: Envelope) -> BaseModel:
        type = envelope.type
        if isinstance(data, msg.HostList):
            return msg.HostListResult(items=await self.list_hosts(data.personality, data.limit))
        if isinstance(data, msg.HostAdd):
            return await self.add(data, envelope)
        if isinstance(data, msg.HostUpdate):
            return await self.update(data, envelope)
        if isinstance(data, msg.HostCommand) and type == "roost.cmd.host.show":
            return await self.show(data.host)
        if isinstance(data, msg.HostCommand) and type == "roost.cmd.host.hardware":
            return await self.hardware(data.host)
        verb = _VERBS.get(type)
        if verb is None:
            raise HostCommandRefused(f"{type} is not a host command")
        if type == "roost.cmd.host.delete":
            assert isinstance(data, msg.HostCommand)
            return await self.delete(data.host, envelope)
        return await self.act(verb, data, envelope)

    async def act(self, verb: str, data: BaseModel, envelope: Envelope) -> msg.HostActionResult:
        """lock, unlock, reboot, reset, power-on, power-off, reinstall, swact."""
        if not isinstance(data, msg.HostLock | msg.HostUnlock | msg.HostSwact | msg.HostCommand):
            raise HostCommandRefused(f"{envelope.type}: not a host action")
        ref = data.host
        force = isinstance(data, msg.HostLock | msg.HostUnlock | msg.HostSwact) and data.force

        def build(_snap: Snapshot, found: HostRow | None) -> machine.Command:
            uuid = _uuid(found)
            commands: dict[str, machine.Command] = {
                "lock": machine.Lock(uuid, force), "unlock": machine.Unlock(uuid, force),
                "reboot": machine.Reboot(uuid), "reset": machine.Reset(uuid),
                "power-on": machine.PowerOn(uuid), "power-off": machine.PowerOff(uuid),
                "reinstall": machine.Reinstall(uuid), "swact": machine.Swact(uuid, force)}
            return commands[verb]

        if verb == "swact":
            return await self._swact(ref, force, envelope)
        outcome = await self._transition(ref, build, cause=f"{verb}{' (force)' if force else ''} by {_who(envelope)}",
                                         origin=envelope, verb=verb + (" --force" if force else ""))
        if not outcome.accepted:
            raise HostCommandRefused(outcome.reason)
        details = [outcome.detail] if outcome.detail else []
        details += await self._carry_out(outcome.effects)
        assert outcome.row is not None
        host = await self.show(outcome.row.uuid)
        if verb == "lock" and host.administrative == "unlocked":
            # The orchestrator could not disable the services: the lock failed and the host is as it was.
            raise HostCommandRefused("; ".join(details) or "the lock failed")
        return msg.HostActionResult(host=host, detail="; ".join(details)[:1024])

    async def add(self, data: msg.HostAdd, envelope: Envelope) -> msg.Host:
        addresses: dict[str, str] = {k: str(v) for k, v in data.addresses.items()}
        subfunctions = data.subfunctions or [data.personality]
        async with self.pool.acquire() as conn, conn.transaction():
            snap = await store.lock_site(conn)
            discovered = next((r for r in snap.rows.values() if r.mgmt_mac == data.mgmt_mac), None)
            hostname = data.hostname or (discovered.hostname if discovered is not None else None) \
                or self._next_name(snap, data.personality)
            if discovered is not None and discovered.personality is None:
                row = await store.save(conn, replace(discovered, hostname=hostname, personality=data.personality,
                                                      subfunctions=tuple(subfunctions), serial=data.serial,
                                                      location=data.location, labels=dict(data.labels),
                                                      addresses=addresses))
            else:
                row = await store.insert(conn, hostname=hostname, personality=data.personality,
                                         subfunctions=subfunctions, mgmt_mac=data.mgmt_mac, serial=data.serial,
                                         location=data.location, labels=data.labels, addresses=addresses)
            if data.bmc is not None:
                row = await store.save(conn, self._with_bmc(row, data.bmc))
                await self._announce_bmc_access(conn, row, envelope)
            await self._event(conn, "roost.host.added", msg.HostEvent(entity_id=row.uuid, version=row.version,
                                                                      host=row.view(active=False)), envelope)
            for change in faults.transition(None, row.state()):
                await self._fault(conn, change, envelope)
            await self._log(conn, envelope, "add", row, f"accepted ({data.personality})")
        return row.view(active=False)

    @staticmethod
    def _next_name(snap: Snapshot, personality: str) -> str:
        if personality not in NAMED_HOSTS:
            raise HostCommandRefused(f"a {personality} needs a hostname")
        taken = {r.hostname for r in snap.rows.values()}
        n = 0
        while f"{personality}-{n}" in taken:
            n += 1
        return f"{personality}-{n}"

    def _with_bmc(self, row: HostRow, bmc: msg.BmcSettings) -> HostRow:
        if bmc.type == "none":
            return replace(row, bmc_type="none", bmc_address="", bmc_username="", bmc_password=None,
                            bmc_key_id=None, bmc_system_id=None, bmc_reachable=None, bmc_outcome=None,
                            bmc_last_error=None)
        if not bmc.address or not bmc.username:
            raise HostCommandRefused("a Redfish BMC needs an address and a username")
        if bmc.username != row.bmc_username and not bmc.password and row.bmc_password is not None:
            raise HostCommandRefused("changing the BMC username needs its password too")
        password, key_id = row.bmc_password, row.bmc_key_id
        if bmc.password:
            password, key_id = self._seal_password(row.uuid, bmc.password)
        return replace(row, bmc_type=bmc.type, bmc_address=bmc.address, bmc_username=bmc.username,
                        bmc_password=password, bmc_key_id=key_id, bmc_system_id=bmc.system_id,
                        bmc_verify_tls=bmc.verify_tls, bmc_reachable=None, bmc_outcome=None, bmc_last_error=None)

    def _seal_password(self, uuid: str, password: str) -> tuple[bytes, str]:
        return self.bmcs.encrypt(uuid, password)

    async def _announce_bmc_access(self, conn: AnyConnection, row: HostRow, origin: Envelope | None) -> None:
        """A controller's BMC access, sealed for the heartbeat service, whenever it changes."""
        access = self.bmcs.sealed_access(row)
        if access is not None:
            await self._event(conn, "roost.host.bmc_access", access, origin)

    async def update(self, data: msg.HostUpdate, envelope: Envelope) -> msg.Host:
        async with self.pool.acquire() as conn, conn.transaction():
            snap = await store.lock_site(conn)
            row = snap.find(data.host)
            if row is None:
                raise HostNotFound(data.host)
            provisioned = row.state().provisioned
            changes: dict[str, Any] = {}
            for name in ("hostname", "personality", "subfunctions"):
                value = getattr(data, name)
                if value is None or value == getattr(row, name):
                    continue
                if provisioned:
                    raise HostCommandRefused(f"{name} cannot change once the host is provisioned "
                                             "(delete and add it again)")
                changes[name] = tuple(value) if name == "subfunctions" else value
            if "personality" in changes and "subfunctions" not in changes:
                changes["subfunctions"] = (changes["personality"],)
            for name in ("serial", "location"):
                if getattr(data, name) is not None:
                    changes[name] = getattr(data, name)
            if data.labels is not None:
                changes["labels"] = dict(data.labels)
            if data.addresses is not None:
                changes["addresses"] = {k: str(v) for k, v in data.addresses.items()}
            new = replace(row, **changes)
            if data.bmc is not None:
                new = self._with_bmc(new, data.bmc)
            if new == row:
                return row.view(active=row.uuid == snap.active)
            saved = await store.save(conn, new)
            view = saved.view(active=saved.uuid == snap.active)
            if data.bmc is not None or "personality" in changes:
                await self._announce_bmc_access(conn, saved, envelope)
            await self._event(conn, "roost.host.updated", msg.HostEvent(entity_id=saved.uuid, version=saved.version,
                                                                        host=view), envelope)
            for change in faults.transition(row.state(), saved.state()):
                await self._fault(conn, change, envelope)
            fields = sorted(set(changes) | ({"bmc"} if data.bmc is not None else set()))
            await self._log(conn, envelope, "update", saved, f"accepted ({', '.join(fields)})")
        return view

    async def delete(self, ref: str, envelope: Envelope) -> msg.HostDeletedResult:
        outcome = await self._transition(ref, lambda _s, row: machine.Delete(_uuid(row)),
                                         cause=f"delete by {_who(envelope)}", origin=envelope, verb="delete")
        if not outcome.accepted:
            raise HostCommandRefused(outcome.reason)
        snap = outcome.snapshot
        assert snap is not None
        row = snap.find(ref)
        assert row is not None
        await self.bmcs.forget(row.uuid)
        return msg.HostDeletedResult(uuid=row.uuid, hostname=row.hostname)

    # -- reads ----------------------------------------------------------------------------------------

    async def list_hosts(self, personality: str | None = None, limit: int = 10_000) -> list[msg.Host]:
        snap = await store.read_snapshot(self.pool)
        rows = [r for r in snap.rows.values() if personality is None or r.personality == personality]
        return [r.view(active=r.uuid == snap.active) for r in rows[:limit]]

    async def show(self, ref: str) -> msg.Host:
        snap = await store.read_snapshot(self.pool)
        row = snap.find(ref)
        if row is None:
            raise HostNotFound(ref)
        return row.view(active=row.uuid == snap.active)

    async def hardware(self, ref: str) -> msg.HostHardware:
        snap = await store.read_snapshot(self.pool)
        row = snap.find(ref)
        if row is None:
            raise HostNotFound(ref)
        hardware = await store.hardware(self.pool, row.uuid)
        return msg.HostHardware(uuid=row.uuid, hostname=row.hostname, hardware=hardware)

    # -- facts ----------------------------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Apply one fact (agent, degrade reason, heartbeat) once: the inbox row and every change it makes commit
        in one transaction; the effects that follow are carried out after the commit."""
        envelope, data = message.envelope, message.data
        effects: list[machine.Effect] = []
        heard_from: str | None = None          # the host whose agent just spoke
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._inbox.first_time(conn, INBOX_CONSUMER, envelope.id):
                return
            try:
                if isinstance(data, msg.AgentHello):
                    heard_from, outcome = await self._agent_hello(conn, message, data)
                    effects = list(outcome.effects) if outcome is not None else []
                else:
                    effects = await self._apply_fact(conn, message)
            except HostNotFound as exc:
                log.warning("fact about an unknown host dropped", type=envelope.type, reason=str(exc))
        await self._carry_out(effects)
        if heard_from is not None:
            self._waiters.wake(heard_from)

    async def _apply_fact(self, conn: AnyConnection, message: Message) -> list[machine.Effect]:
        envelope, data = message.envelope, message.data
        outcome: Outcome | None = None
        if isinstance(data, msg.AgentInventory):
            await self._agent_inventory(conn, message, data)
        elif isinstance(data, msg.DegradeSet):
            outcome = await self._transition(data.host, lambda _s, row: machine.DegradeSet(_uuid(row), data.key),
                                             cause=f"degrade reason {data.key} from {envelope.source}",
                                             reason_texts={data.key: data.text}, conn=conn)
        elif isinstance(data, msg.DegradeClear):
            outcome = await self._transition(data.host, lambda _s, row: machine.DegradeCleared(_uuid(row), data.key),
                                             cause=f"degrade reason {data.key} cleared by {envelope.source}",
                                             conn=conn)
        elif isinstance(data, hb.HostHealth):
            outcome = await self._host_health(conn, data)
        elif isinstance(data, hb.ActiveController):
            outcome = await self._active_controller(conn, data)
        elif isinstance(data, hb.AgentHeartbeatAlarm):
            return []                # on the agents' subjects, for the heartbeat service (it owns 950.006)
        else:
            raise Reject(f"{envelope.type} is not a fact inventory applies")
        return list(outcome.effects) if outcome is not None else []

    async def _host_health(self, conn: AnyConnection, data: hb.HostHealth) -> Outcome | None:
        if not await advance(conn, INBOX_CONSUMER, "heartbeat.host_health", data.entity_id, data.version):
            return None
        return await self._transition(
            data.entity_id or data.hostname,
            lambda _s, row: machine.HeartbeatHealth(_uuid(row), data.state, tuple(data.networks_down)),
            cause=f"heartbeat: {data.state}{': ' + data.reason if data.reason else ''}",
            reason_texts={f"heartbeat.{n}": f"heartbeat lost on the {n} network" for n in data.networks_down},
            conn=conn)

    async def _active_controller(self, conn: AnyConnection, data: hb.ActiveController) -> Outcome:
        def build(snap: Snapshot, _row: HostRow | None) -> machine.Event | None:
            if data.version <= snap.active_epoch:
                return None                      # an older announcement than the one applied
            if data.active is None:
                return machine.ActiveChanged(None)
            row = snap.find(data.active)
            if row is None:
                raise HostNotFound(data.active)
            return machine.ActiveChanged(row.uuid)

        async def record_epoch(conn: AnyConnection, locked: Snapshot) -> None:
            await conn.execute(f"UPDATE {store.SCHEMA}.site SET active_epoch = $1 WHERE id = 1", data.version)

        return await self._transition(None, build, cause=f"heartbeat: active controller {data.active}",
                                      before_commit=record_epoch, conn=conn)

    async def _agent_host(self, conn: AnyConnection, agent: str, macs: Sequence[str]) -> HostRow:
        """The host of an agent: bound by name, else by one of its MACs, else a new unprovisioned host."""
        snap = await store.lock_site(conn)
        row = snap.find_agent(agent)
        if row is not None:
            return row
        row = next((r for r in snap.rows.values() if r.mgmt_mac in macs and r.agent is None), None)
        if row is not None:
            return await store.save(conn, replace(row, agent=agent))
        taken = {r.mgmt_mac for r in snap.rows.values()}
        mac = next((m for m in macs if m not in taken), None)
        row = await store.insert(conn, hostname=None, personality=None, subfunctions=(), mgmt_mac=mac, agent=agent)
        await self._event(conn, "roost.host.discovered", msg.HostEvent(entity_id=row.uuid, version=row.version,
                                                                       host=row.view(active=False)), None)
        log.info("unknown agent recorded as an unprovisioned host", agent=agent, uuid=row.uuid, mac=mac)
        return row

    def _check_agent_subject(self, message: Message, agent: str) -> None:
        parts = message.subject.split(".")
        if len(parts) < 4 or parts[2] != agent:
            raise Reject(f"agent {agent!r} announced itself on {message.subject}: an agent publishes only on "
                         f"roost.agent.<its name>.*")

    async def _agent_hello(self, conn: AnyConnection, message: Message,
                           data: msg.AgentHello) -> tuple[str, Outcome | None]:
        """Record an agent's hello; its host's uuid, and the outcome if it came back online."""
        self._check_agent_subject(message, data.agent)
        row = await self._agent_host(conn, data.agent, data.macs)
        await store.touch_agent(conn, row.uuid, _now(), data.interval_seconds, data.boot_id, data.uptime_seconds)
        if row.agent_alive and not (row.administrative == "locked" and row.availability == "offline"):
            return row.uuid, None
        # silent until now, or back from a reboot or reset
        return row.uuid, await self._transition(row.uuid, lambda _s, _r: machine.AgentOnline(row.uuid),
                                                cause=f"agent {data.agent} announced itself", conn=conn)

    async def _agent_inventory(self, conn: AnyConnection, message: Message, data: msg.AgentInventory) -> None:
        self._check_agent_subject(message, data.agent)
        macs = [p.mac for p in data.hardware.ports if p.mac]
        now = await self._agent_host(conn, data.agent, macs)          # under the site lock from here on
        changed = await store.put_hardware(conn, now.uuid, data.hardware.model_copy(update={"source": "agent"}))
        if not now.inventoried:
            now = await store.save(conn, replace(now, inventoried=True))
        elif changed:
            now = replace(now, version=await store.bump(conn, now.uuid) or now.version)
        if changed:
            await self._event(conn, "roost.host.inventory_updated", msg.HostInventoryUpdated(
                entity_id=now.uuid, version=now.version, hostname=now.hostname,
                hardware=await store.hardware(conn, now.uuid)), None)

    async def refresh_metrics(self) -> None:
        """Set ``roost_hosts`` from the database."""
        snap = await store.read_snapshot(self.pool)
        metrics.set_hosts((r.personality, r.administrative, r.operational, r.availability) for r in snap.rows.values())

    async def _gauge(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("host gauge not refreshed", error=str(exc))
            await asyncio.sleep(self.metrics_interval)

    async def _watch_agents(self) -> None:
        """Mark agents silent for three of their intervals offline."""
        while True:
            await asyncio.sleep(self.agent_check_interval)
            try:
                snap = await store.read_snapshot(self.pool)
                for row in snap.rows.values():
                    if row.agent_alive and not self._agent_alive(row):
                        await self._fact(machine.AgentOffline(row.uuid), cause=f"agent {row.agent} fell silent")
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("agent liveness check failed; will retry", error=str(exc))

