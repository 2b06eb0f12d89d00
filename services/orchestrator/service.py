"""The orchestrator service: the Kubernetes side of host lock and unlock, and update strategies.

Commands served (group ``orchestrator``, several at once: one host's drain never holds up another's;
the host-services commands have a consumer of their own, so a strategy's lock, which makes inventory ask
for one, never waits behind strategy commands):

* ``roost.cmd.hostservices.disable`` (``action`` ``lock`` or ``force-lock``): inventory asks it before it
  locks a host and waits for the answer: cordon the host's node, evict its pods, taint it
  (``services.orchestrator.maintenance``);
* ``roost.cmd.hostservices.enable`` (``action`` ``unlock``): after an unlock: untaint, uncordon.

The answer is ``HostServicesResult(done, detail)``; a lock that cannot drain the node in time answers
``done=False`` with the pods that blocked it, and leaves the node in service.

Kubernetes is configured by ``OrchestratorSettings`` (``ROOST_ORCHESTRATOR_KUBECONFIG`` or
``ROOST_ORCHESTRATOR_KUBE_IN_CLUSTER``); without it every command is done, saying that the node steps were
skipped.  ``build_orchestrator()`` builds the service from those settings.

A drain in flight when the service stops is not rolled back: its command was not acknowledged, so the
broker delivers it again and the next instance carries on from the node as it finds it.

Update strategies (one at a time; tables in ``migrations/``, the model in ``strategy``, the state machine in
``apply``, the steps in ``executor``):

* ``roost.cmd.strategy.create``: reads the hosts from inventory (``roost.cmd.host.list``) and the release
  each host's agent runs (``roost.cmd.agent.<agent>.release``; an agent that does not answer counts as not
  on the release), builds the stages and steps and stores the strategy ``ready-to-apply``; a site that
  cannot be updated safely, or has alarms its restrictions do not ignore (as the VIM's build), is refused
  with the reason (nothing is stored: no build-failed strategy to delete);
* ``roost.cmd.strategy.show``: the strategy with its phases, stages and steps;
* ``roost.cmd.strategy.apply``: ``applying``; the executor takes it from there (``stage_id``: only the next
  stage, then it pauses, still applying, until the next apply, as the VIM's apply-stage);
* ``roost.cmd.strategy.abort``: flags the abort; the executor takes it up at once (a passive step is cut
  short, an acting one finishes) and the answer is the strategy once it is ``aborting``;
* ``roost.cmd.strategy.delete``: refused while applying or aborting unless ``force``.

The same over REST: ``services.orchestrator.api`` (``/api/orchestration/sw-deploy/strategy``, the VIM's shape).

The executor runs in one replica at a time (a PostgreSQL advisory lock); at start, and whenever it is
woken or every ``DRIVE_INTERVAL`` seconds, it resumes a strategy that is applying or aborting: a restarted
orchestrator carries on from the persisted step.  Stopping the service abandons the step in flight just
as a crash would (its durable marker stays): the next start resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import structlog
from fastapi import APIRouter
from pydantic import BaseModel

from schemas import inventory as inv
from schemas import orchestrator as msg
from services.core.bus.abc import ConsumerOptions, RequestTimeout
from services.core.bus.bus import Message, Reject, is_unhandled
from services.core.host import ServiceContext
from services.orchestrator import apply, metrics, store
from services.orchestrator.apply import StepRef
from services.orchestrator.executor import Executor, StepFailed, StepRunner
from services.orchestrator.kube import KubeApi, KubernetesApi
from services.orchestrator.maintenance import HostMaintenance
from services.orchestrator.settings import OrchestratorSettings, load_orchestrator_settings
from services.orchestrator.strategy import SYSTEM_STABILIZE, BuildError, HostInfo, Release, Step, build

log = structlog.get_logger("roost.orchestrator")

NAME = "orchestrator"
GROUP = "orchestrator"
HOST_SERVICES = "roost.cmd.hostservices.>"
DISABLE = "roost.cmd.hostservices.disable"
ENABLE = "roost.cmd.hostservices.enable"
STRATEGY = "roost.cmd.strategy.>"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DRIVE_INTERVAL = 5.0
ABORT_WAIT = 10.0
RELEASE_QUERY_TIMEOUT = 5.0


class NoStrategy(Reject):
    """There is no strategy (the REST API answers 404)."""


class Unavailable(Reject):
    """Another service the command needs did not answer (the REST API answers 503)."""


class OrchestratorService:
    """The ``orchestrator`` component.  ``kube``: a ready ``KubeApi`` (else one is made from the settings)."""

    name = NAME
    migrations: Path | None = MIGRATIONS

    def __init__(self, settings: OrchestratorSettings | None = None, *, kube: KubeApi | None = None,
                 boundary: Callable[[str, StepRef, Step], object] | None = None) -> None:
        """``boundary``: called at each step boundary of a strategy (tests: a crash there)."""
        self.settings = settings if settings is not None else OrchestratorSettings()
        self._kube = kube
        self._own_kube = False
        self._maintenance: HostMaintenance | None = None
        self._boundary = boundary
        self._ctx: ServiceContext | None = None
        self._executor: Executor | None = None
        self._driver: asyncio.Task[None] | None = None
        self._router: APIRouter | None = None
        self._wake = asyncio.Event()
        self.driver_error: BaseException | None = None

    @property
    def maintenance(self) -> HostMaintenance:
        if self._maintenance is None:
            raise RuntimeError("the orchestrator service has not started")
        return self._maintenance

    @property
    def consumer_options(self) -> ConsumerOptions:
        """Drains of different hosts at once; a delivery stays unsettled for as long as its drain may take."""
        return ConsumerOptions(concurrency=16, ack_wait=self.settings.drain_timeout + 60.0)

    async def start(self, ctx: ServiceContext) -> None:
        if self._kube is None:
            self._kube = await connect(self.settings)
            self._own_kube = self._kube is not None
        s = self.settings
        self._maintenance = HostMaintenance(self._kube, drain_timeout=s.drain_timeout,
                                            poll_interval=s.drain_poll_interval, grace_seconds=s.eviction_grace_seconds,
                                            taint_key=s.lock_taint_key, skip_wait_after=s.drain_skip_wait_after)
        if self._kube is None:
            log.info("no Kubernetes configured: lock and unlock will skip the node steps")
        else:
            log.info("host maintenance drives Kubernetes", kubernetes=self._kube.description,
                     drain_timeout=s.drain_timeout)
        await ctx.bus.serve(HOST_SERVICES, GROUP, self.command, options=self.consumer_options)
        self._ctx = ctx
        self._executor = Executor(ctx.pool, ctx.bus, ctx.outbox, StepRunner(ctx.bus, s), boundary=self._boundary)
        await ctx.bus.serve(STRATEGY, GROUP, self.strategy_command, options=ConsumerOptions(concurrency=4))
        self._driver = asyncio.create_task(self._drive(), name="orchestrator-strategy-driver")

    async def stop(self) -> None:
        if self._driver is not None:
            driver, self._driver = self._driver, None
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver
        if self._kube is not None and self._own_kube:
            kube, self._kube, self._own_kube = self._kube, None, False
            await kube.close()

    def routers(self) -> Sequence[APIRouter]:
        if self._router is None:
            from services.orchestrator.api import build_router
            self._router = build_router(self)
        return [self._router]

    async def command(self, message: Message) -> BaseModel:
        """``roost.cmd.hostservices.*``: carry out the host's node steps and say whether they are done."""
        data = message.data
        envelope = message.envelope
        if not isinstance(data, msg.HostServices):
            raise Reject(f"{envelope.type} is not a host-services command")
        if envelope.type == DISABLE and data.action in ("lock", "force-lock"):
            result = await self.maintenance.disable(data.hostname, force=data.action == "force-lock",
                                                    issued=envelope.time, deadline=envelope.deadline)
        elif envelope.type == ENABLE and data.action == "unlock":
            result = await self.maintenance.enable(data.hostname, issued=envelope.time)
        else:
            raise Reject(f"{envelope.type} does not take the action {data.action!r}")
        return msg.HostServicesResult(done=result.done, detail=result.detail)

    # -- update strategies ----------------------------------------------------------------------------

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("the orchestrator service has not started")
        return self._ctx

    def wake(self) -> None:
        self._wake.set()

    async def _drive(self) -> None:
        """Run the executor whenever there may be work, in one replica at a time."""
        assert self._executor is not None
        while True:
            self._wake.clear()
            try:
                async with self.ctx.pool.acquire() as conn:
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", store.LOCK_KEY):
                        try:
                            await self._executor.run()
                        finally:
                            with contextlib.suppress(Exception):
                                await conn.execute("SELECT pg_advisory_unlock($1)", store.LOCK_KEY)
            except store.StrategyGone as exc:
                log.warning("strategy deleted while it was applied; stopped", reason=str(exc))
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("strategy executor: database trouble; will try again", error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("strategy executor failed; will try again", error=str(exc))
            except BaseException as exc:           # a test's crash at a step boundary: stop here, like a kill
                self.driver_error = exc
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DRIVE_INTERVAL)

    async def strategy_command(self, message: Message) -> BaseModel:
        data, type_ = message.data, message.envelope.type
        try:
            if type_ == "roost.cmd.strategy.create" and isinstance(data, msg.StrategyCreate):
                return await self.create(data)
            if type_ == "roost.cmd.strategy.show":
                return await self.show()
            if type_ == "roost.cmd.strategy.apply" and isinstance(data, msg.StrategyApply):
                return await self.apply(data.stage_id)
            if type_ == "roost.cmd.strategy.abort":
                return await self.abort()
            if type_ == "roost.cmd.strategy.delete" and isinstance(data, msg.StrategyDelete):
                return await self.delete(data.force)
        except (apply.NotAllowed, store.StrategyExists, BuildError) as exc:
            raise Reject(str(exc)) from None
        raise Reject(f"{type_} is not a strategy command")

    async def _hosts(self) -> list[HostInfo]:
        bus = self.ctx.bus
        try:
            reply = await bus.request(bus.envelope("roost.cmd.host.list", inv.HostList()),
                                      timeout=self.settings.query_timeout)
        except RequestTimeout:
            raise Unavailable("inventory did not answer roost.cmd.host.list in time") from None
        if not reply.ok:
            raise Unavailable("inventory is not running" if is_unhandled(reply) else f"inventory: {reply.reason}")
        hosts = [h for h in inv.HostListResult.model_validate(reply.result).items
                 if h.hostname is not None and h.personality is not None]
        releases = await asyncio.gather(*(self._release_of(h) for h in hosts))
        return [HostInfo(uuid=h.uuid, hostname=h.hostname, personality=h.personality,  # type: ignore[arg-type]
                         administrative=h.administrative, operational=h.operational, availability=h.availability,
                         active=h.active, release=r) for h, r in zip(hosts, releases, strict=True)]

    async def _release_of(self, host: inv.Host) -> str | None:
        if host.agent is None:
            return None
        bus = self.ctx.bus
        try:
            reply = await bus.request(bus.envelope("roost.cmd.agent.release", msg.AgentReleaseQuery()),
                                      subject=f"roost.cmd.agent.{host.agent}.release", timeout=RELEASE_QUERY_TIMEOUT)
        except RequestTimeout:
            return None
        if not reply.ok:
            return None
        release = msg.AgentRelease.model_validate(reply.result).release
        return release.name if release is not None else None

    async def create(self, request: msg.StrategyCreate) -> msg.StrategyView:
        async with self.ctx.pool.acquire() as conn:
            existing = await store.load(conn)
        if existing is not None:
            raise store.StrategyExists(f"a strategy exists already ({existing.strategy.state}): delete it first "
                                       "(one strategy at a time)")
        options = msg.StrategyOptions.model_validate(request.model_dump(exclude={"release"}))
        r = request.release
        release = Release(r.name, r.version, r.reboot_required)
        plan = build(options, release, await self._hosts())
        await self._check_alarms(options.alarm_restrictions)
        if self.settings.stabilize_seconds is not None:
            for stage in plan.stages:
                for step in stage.steps:
                    if step.name == SYSTEM_STABILIZE:
                        step.timeout = self.settings.stabilize_seconds
        now = datetime.now(UTC)
        strategy = apply.create(store.new_uuid(), release, options, plan, now)
        transition = apply.Transition("strategy", strategy.state, "apply", reason="built")
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            await store.insert(conn, strategy, self.ctx.bus, self.ctx.outbox, [transition])
        metrics.record_strategy_state(strategy.state)
        log.info("strategy created", uuid=strategy.uuid, release=release.name, stages=len(plan.stages),
                 skipped=plan.skipped)
        return await self._view()

    async def _check_alarms(self, restrictions: msg.AlarmRestrictions) -> None:
        """As the VIM's build: no strategy while alarms that its restrictions do not ignore are active."""
        if restrictions == "permissive" or self._executor is None:
            return
        runner = self._executor.runner
        try:
            found = await runner.blocking_alarms(restrictions)
        except StepFailed as exc:
            raise Unavailable(str(exc)) from None
        except Exception as exc:                    # the alarms service answered with an error
            raise Unavailable(f"the alarms cannot be checked: {exc}") from None
        if found:
            raise BuildError(f"{runner.describe(found)} (alarm restrictions: {restrictions}): clear them, or "
                             "create the strategy with relaxed or permissive alarm restrictions")

    async def _view(self) -> msg.StrategyView:
        async with self.ctx.pool.acquire() as conn:
            loaded = await store.load(conn)
        if loaded is None:
            raise NoStrategy("there is no strategy")
        return store.view(loaded)

    async def show(self) -> msg.StrategyShowResult:
        async with self.ctx.pool.acquire() as conn:
            loaded = await store.load(conn)
        return msg.StrategyShowResult(strategy=store.view(loaded) if loaded is not None else None)

    async def apply(self, stage_id: int | None = None) -> msg.StrategyView:
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            loaded = await store.load(conn, for_update=True)
            if loaded is None:
                raise NoStrategy("there is no strategy: create one first")
            transitions = apply.begin_apply(loaded.strategy, datetime.now(UTC), stage_id)
            await store.save(conn, loaded.strategy, transitions, self.ctx.bus, self.ctx.outbox)
        metrics.record_strategy_state(loaded.strategy.state)
        self.wake()
        return await self._view()

    async def abort(self) -> msg.StrategyView:
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            loaded = await store.load(conn, for_update=True)
            if loaded is None:
                raise NoStrategy("there is no strategy")
            if loaded.strategy.state != "applying":
                raise apply.NotAllowed(f"the strategy is {loaded.strategy.state}: only a strategy being applied "
                                       "can be aborted")
            await store.request_abort(conn)
        if self._executor is not None:
            self._executor.abort_wake.set()             # a step in flight here
        self.wake()                                     # or nothing running here (paused between two stages)
        deadline = asyncio.get_running_loop().time() + ABORT_WAIT
        while asyncio.get_running_loop().time() < deadline:      # the executor takes it up (any replica)
            view = await self._view()
            if view.state != "applying":
                return view
            await asyncio.sleep(0.1)
        return await self._view()

    async def delete(self, force: bool) -> msg.StrategyDeleted:
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            loaded = await store.load(conn, for_update=True)
            if loaded is None:
                raise NoStrategy("there is no strategy")
            apply.can_delete(loaded.strategy, force)
            await store.delete(conn, loaded.strategy.uuid)
        if self._executor is not None:
            self._executor.abort_wake.set()                  # a running executor notices and stops
        metrics.record_strategy_state(None)
        log.info("strategy deleted", uuid=loaded.strategy.uuid, state=loaded.strategy.state, force=force)
        return msg.StrategyDeleted(uuid=loaded.strategy.uuid, state=loaded.strategy.state)


async def connect(settings: OrchestratorSettings) -> KubeApi | None:
    """The Kubernetes API the settings name; None when none is configured."""
    if settings.kubeconfig is not None:
        return await KubernetesApi.from_kubeconfig(settings.kubeconfig, context=settings.kube_context,
                                                   request_timeout=settings.kube_request_timeout)
    if settings.kube_in_cluster:
        return await KubernetesApi.in_cluster(request_timeout=settings.kube_request_timeout)
    return None


def build_orchestrator(settings: OrchestratorSettings | None = None) -> OrchestratorService:
    """The orchestrator as ``roost up`` runs it: configured from ``ROOST_ORCHESTRATOR_*`` unless ``settings``
    are given.  Raises ``services.core.settings.ConfigError`` (one readable line) on bad settings."""
    return OrchestratorService(settings if settings is not None else load_orchestrator_settings())
