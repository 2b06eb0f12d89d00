"""Applying the update strategy: the steps against the world, and the loop that drives the state machine.

:class:`StepRunner` carries out one step.  Every step that changes the world looks at it first and acts
only on what is not done yet, so a step resumed after a restart never repeats what it already did:

* ``lock-hosts``: ``roost.cmd.host.show``; a host locked already is done; a host with an action under way
  (a lock sent before the restart, still draining) is waited for; only an unlocked, idle host is sent
  ``roost.cmd.host.lock`` (refusals are retried ``max_retries`` times, ``retry_delay`` apart).  No marker is
  needed: a lock that went out just before a restart and is still queued is refused by inventory if it
  comes again (it refuses to lock a host that is locked or has an action under way).  Inventory's
  lock asks this very service to disable the host's services (``roost.cmd.hostservices.disable``): that
  is served by its own consumer, concurrently, so the step waiting for the lock does not block it;
* ``unlock-hosts``: likewise (``roost.cmd.host.unlock`` only to a locked, idle host), then waits until the
  host is enabled and available again (its in-test checks passed); a host that fails them fails the step;
* ``swact-hosts``: ``roost.cmd.host.swact`` only while the host is still the active controller and no swact
  was sent for it (``sent``, committed before the command goes out: inventory hears of the new active
  controller only later, so the world alone cannot tell), then waits until it is not;
* ``apply-update``: asks the host's agent which release it runs (``roost.cmd.agent.<agent>.release``); only
  a host not on the target release is sent ``roost.cmd.agent.<agent>.update`` (which is idempotent on the
  agent too).  A refused install fails the step with the agent's reason; an agent that does not answer
  (restarting) is asked again until the step times out;
* ``reboot-hosts``: ``roost.cmd.host.reboot``, unless the host's uptime shows it rebooted since the step
  started;
* ``query-alarms`` / ``wait-alarms-clear`` / ``wait-data-sync``: ``roost.cmd.alarm.list`` filtered by the
  strategy's alarm restrictions (``apply.blocking_alarms``); ``system-stabilize`` waits out its time and
  fails if a host of its stage changes state meanwhile (goes offline, fails).

Hosts of one step are handled concurrently (a parallel worker stage); the step fails if any host fails,
once all have finished.  A step ends at its deadline (its durable start plus its timeout) as
``timed-out`` (``system-stabilize``: as a success).

:class:`Executor` loads the strategy and, while it is applying or aborting: marks the current step
started and commits that (the durable marker), runs it, commits its outcome with the events; an
operator's abort (a flag in the strategy's row) is taken up as soon as it is seen: a passive step is cut
short, an acting one finishes first.  Three failpoints (``services.core.failpoints``) let a test kill the
process at each step boundary: ``orchestrator.step_started`` (marker committed, nothing done yet),
``orchestrator.step_acted`` (the step did its work, its outcome not yet committed) and
``orchestrator.step_finished`` (outcome committed), each also as ``orchestrator.<boundary>.<step name>``
(``orchestrator.step_acted.lock-hosts``: kill only there); ``boundary(name, ref, step)`` (plain or async) is
the same hook for in-process tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel

from schemas import alarms as am
from schemas import inventory as inv
from schemas import orchestrator as msg
from schemas.envelope import CommandReply
from services.core.bus.abc import RequestTimeout
from services.core.bus.bus import Bus, is_unhandled
from services.core.db.outbox import Outbox
from services.core.failpoints import failpoint
from services.orchestrator import apply, metrics, store
from services.orchestrator.apply import Outcome, StepRef, Strategy, Transition
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.strategy import (
    APPLY_UPDATE,
    LOCK_HOSTS,
    QUERY_ALARMS,
    REBOOT_HOSTS,
    SWACT_HOSTS,
    SYSTEM_STABILIZE,
    UNLOCK_HOSTS,
    WAIT_ALARMS_CLEAR,
    WAIT_DATA_SYNC,
    Step,
)

log = structlog.get_logger("roost.orchestrator.strategy")

T = TypeVar("T")
BOUNDARIES = ("step_started", "step_acted", "step_finished")
IN_SERVICE = ("available", "degraded")
NO_ANSWER = "no answer in time"
ALARMS_SHOWN = 5


class StepFailed(Exception):
    """A host's part of a step cannot succeed; the message says why."""


def _now() -> datetime:
    return datetime.now(UTC)


def _same(release: msg.Release | None, target: msg.Release) -> bool:
    return release is not None and (release.name, release.version) == (target.name, target.version)


class StepRunner:
    """Carries out steps against inventory, the alarms service and the agents, over the bus.  ``remember``
    persists the step (its ``sent`` list) before a command that must not go twice is sent."""

    def __init__(self, bus: Bus, settings: OrchestratorSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.remember: Callable[[], Awaitable[None]] | None = None

    async def _mark(self, step: Step, host: str, sent: bool) -> None:
        if sent and host not in step.sent:
            step.sent.append(host)
        elif not sent and host in step.sent:
            step.sent.remove(host)
        else:
            return
        if self.remember is not None:
            await self.remember()

    # -- asking ---------------------------------------------------------------------------------------

    async def _request(self, type: str, data: BaseModel | dict[str, Any], *, subject: str | None = None,
                       timeout: float | None = None) -> CommandReply:
        envelope = self.bus.envelope(type, data)
        try:
            return await self.bus.request(envelope, subject=subject, timeout=timeout or self.settings.query_timeout)
        except (RequestTimeout, TimeoutError):
            return CommandReply.model_validate({"status": "failed", "command_id": envelope.id, "command_type": type,
                                                "reason": NO_ANSWER})

    async def host(self, name: str) -> inv.Host:
        reply = await self._request("roost.cmd.host.show", inv.HostCommand(host=name))
        if is_unhandled(reply):
            raise _Retry("inventory does not answer (not running?)")
        if not reply.ok:
            if "not found" in (reply.reason or "").lower() or "no host" in (reply.reason or "").lower():
                raise StepFailed(f"{name}: {reply.reason}")
            raise _Retry(f"{name}: {reply.reason}")
        return inv.Host.model_validate(reply.result)

    async def blocking_alarms(self, restrictions: msg.AlarmRestrictions) -> list[am.ActiveAlarm]:
        reply = await self._request("roost.cmd.alarm.list", am.AlarmList())
        if is_unhandled(reply):
            raise StepFailed("no alarms service answers roost.cmd.alarm.list: the alarms cannot be checked")
        if not reply.ok:
            raise _Retry(f"the alarms service: {reply.reason}")
        return apply.blocking_alarms(am.AlarmListResult.model_validate(reply.result).items, restrictions)

    @staticmethod
    def describe(alarms: list[am.ActiveAlarm]) -> str:
        shown = ", ".join(f"{a.alarm_id} {a.entity_instance_id} ({a.severity})" for a in alarms[:ALARMS_SHOWN])
        more = f" and {len(alarms) - ALARMS_SHOWN} more" if len(alarms) > ALARMS_SHOWN else ""
        return f"{len(alarms)} active alarm{'s' if len(alarms) != 1 else ''}: {shown}{more}"

    async def pause(self, seconds: float | None = None) -> None:
        await asyncio.sleep(self.settings.strategy_poll_interval if seconds is None else seconds)

    def retry_delay(self, step: Step) -> float:
        cap = self.settings.retry_delay_max
        return float(step.retry_delay) if cap is None else min(float(step.retry_delay), cap)

    # -- running a step -------------------------------------------------------------------------------

    async def run(self, s: Strategy, step: Step, *, resumed: bool, hosts: Sequence[str] = ()) -> Outcome:
        """Carry out ``step`` until its deadline; how it ended.  ``hosts``: those of its stage."""
        now = _now()
        left = (apply.deadline(step, now) - now).total_seconds()
        progress: dict[str, str] = {}
        try:
            async with asyncio.timeout(max(left, 0.0)):
                if step.name == SYSTEM_STABILIZE:
                    return await self._stabilize(step, hosts)
                return await self._run(s, step, resumed, progress)
        except TimeoutError:                        # (an OSError: first)
            if step.name == SYSTEM_STABILIZE:
                return Outcome("success", f"stable for {step.timeout} s")
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(progress.items()))
            return Outcome("timed-out", f"not done within {step.timeout} s" + (f" ({detail})" if detail else ""))
        except (asyncpg.PostgresError, OSError, store.StrategyGone):
            raise                                   # the database: the executor tries again, the step resumes
        except Exception as exc:                    # a reply that does not parse, a bug: fail, do not loop
            log.exception("strategy step failed unexpectedly", step=step.name, hosts=step.entity_names)
            return Outcome("failed", f"unexpected error: {type(exc).__name__}: {exc}")

    async def _run(self, s: Strategy, step: Step, resumed: bool, progress: dict[str, str]) -> Outcome:
        restrictions = s.options.alarm_restrictions
        if step.name == QUERY_ALARMS:
            if restrictions == "permissive":
                return Outcome("success", "alarm restrictions are permissive: not checked")
            found = await self._retrying(lambda: self.blocking_alarms(restrictions), progress, "alarms")
            if found:
                return Outcome("failed", f"{self.describe(found)} (alarm restrictions: {restrictions})")
            return Outcome("success")
        if step.name in (WAIT_ALARMS_CLEAR, WAIT_DATA_SYNC):
            return await self._wait_alarms_clear(step, restrictions, progress)
        act: Callable[[str, str], Awaitable[str]]
        if step.name == LOCK_HOSTS:
            def act(name: str, _uuid: str) -> Awaitable[str]:
                return self._lock(name, step, progress)
        elif step.name == UNLOCK_HOSTS:
            def act(name: str, _uuid: str) -> Awaitable[str]:
                return self._unlock(name, step, progress)
        elif step.name == SWACT_HOSTS:
            def act(name: str, _uuid: str) -> Awaitable[str]:
                return self._swact(name, step, progress)
        elif step.name == APPLY_UPDATE:
            target = msg.Release(name=s.release.name, version=s.release.version,
                                 reboot_required=s.release.reboot_required)

            def act(name: str, _uuid: str) -> Awaitable[str]:
                return self._update(name, target, step, progress)
        elif step.name == REBOOT_HOSTS:
            def act(name: str, _uuid: str) -> Awaitable[str]:
                return self._reboot(name, step, resumed, progress)
        else:
            return Outcome("failed", f"unknown step {step.name}")
        results = await asyncio.gather(*(act(n, u) for n, u in zip(step.entity_names, step.entity_uuids, strict=True)),
                                       return_exceptions=True)
        failures = []
        for result in results:
            if isinstance(result, StepFailed):
                failures.append(str(result))
            elif isinstance(result, BaseException):
                raise result
        if failures:
            return Outcome("failed", "; ".join(failures))
        return Outcome("success", "; ".join(str(r) for r in results if r))

    async def _states(self, hosts: Sequence[str]) -> dict[str, str]:
        """Each host's administrative-operational-availability (the ones inventory answers for)."""
        out = {}
        for name in hosts:
            with contextlib.suppress(_Retry, StepFailed):
                h = await self.host(name)
                out[name] = f"{h.administrative}-{h.operational}-{h.availability}"
        return out

    async def _stabilize(self, step: Step, hosts: Sequence[str]) -> Outcome:
        """Wait out the step's time; fail if a host of the stage changes state meanwhile (as the VIM's: a host
        that goes offline or fails while it should settle).  Resumed after a restart, it compares with the
        states it finds then."""
        before = await self._states(hosts)
        while True:
            left = (apply.deadline(step, _now()) - _now()).total_seconds()
            if left > 0:
                await asyncio.sleep(min(left, self.settings.strategy_poll_interval))
            now = await self._states(hosts)
            changed = [f"{n} went from {before[n]} to {now[n]}" for n in before if n in now and now[n] != before[n]]
            if changed:
                return Outcome("failed", "; ".join(changed) + " while the system stabilised")
            if left <= 0:
                return Outcome("success", f"stable for {step.timeout} s")

    async def _retrying(self, fn: Callable[[], Awaitable[T]], progress: dict[str, str], key: str) -> T:
        while True:
            try:
                return await fn()
            except _Retry as exc:
                progress[key] = str(exc)
                await self.pause()

    async def _wait_alarms_clear(self, step: Step, restrictions: msg.AlarmRestrictions,
                                 progress: dict[str, str]) -> Outcome:
        if restrictions == "permissive":
            return Outcome("success", "alarm restrictions are permissive: not checked")
        started = step.started_at or _now()
        first = self.settings.alarms_first_delay - (_now() - started).total_seconds()
        if first > 0:
            await asyncio.sleep(first)
        while True:
            found = await self._retrying(lambda: self.blocking_alarms(restrictions), progress, "alarms")
            if not found:
                return Outcome("success")
            progress["alarms"] = self.describe(found)
            await self.pause()

    async def _lock(self, name: str, step: Step, progress: dict[str, str]) -> str:
        attempts, last = 0, ""
        while True:
            host = await self._retrying(lambda: self.host(name), progress, name)
            if host.administrative == "locked" and host.action == "none":
                progress[name] = "locked"
                return f"{name} locked" if attempts else f"{name} was locked already"
            if host.action != "none" or host.administrative == "locked":
                progress[name] = f"waiting: {host.task or host.action}"
                await self.pause()
                continue
            if attempts > step.max_retries:
                raise StepFailed(f"lock of {name} refused: {last}")
            if attempts:
                await self.pause(self.retry_delay(step))
            attempts += 1
            progress[name] = f"locking (attempt {attempts})"
            reply = await self._request("roost.cmd.host.lock", inv.HostLock(host=name), timeout=_left(step))
            if not reply.ok:
                last = "inventory does not answer" if is_unhandled(reply) else reply.reason or "refused"
                log.info("strategy: lock refused", host=name, attempt=attempts, reason=last)
                progress[name] = f"lock refused: {last}"

    async def _unlock(self, name: str, step: Step, progress: dict[str, str]) -> str:
        attempts, last = 0, ""
        while True:
            host = await self._retrying(lambda: self.host(name), progress, name)
            if host.administrative == "unlocked":
                if host.action == "none" and host.operational == "enabled" and host.availability in IN_SERVICE:
                    progress[name] = host.availability
                    return f"{name} unlocked and {host.availability}" if attempts else f"{name} was unlocked already"
                if host.action == "none" and host.availability == "failed":
                    raise StepFailed(f"{name} failed after its unlock")
                progress[name] = f"waiting: {host.availability} {host.task}".strip()
                await self.pause()
                continue
            if host.action != "none":
                progress[name] = f"waiting: {host.task or host.action}"
                await self.pause()
                continue
            if attempts > step.max_retries:
                raise StepFailed(f"unlock of {name} refused: {last}")
            if attempts:
                await self.pause(self.retry_delay(step))
            attempts += 1
            progress[name] = f"unlocking (attempt {attempts})"
            reply = await self._request("roost.cmd.host.unlock", inv.HostUnlock(host=name), timeout=_left(step))
            if not reply.ok:
                last = "inventory does not answer" if is_unhandled(reply) else reply.reason or "refused"
                log.info("strategy: unlock refused", host=name, attempt=attempts, reason=last)
                progress[name] = f"unlock refused: {last}"

    async def _swact(self, name: str, step: Step, progress: dict[str, str]) -> str:
        """A swact is not repeated even after a restart: the host is recorded in ``step.sent`` (committed)
        before the command goes out; with it recorded, the step only waits for the role to move (a second
        swact while inventory has not yet heard of the first would move the role back)."""
        attempts, last = 0, ""
        while True:
            host = await self._retrying(lambda: self.host(name), progress, name)
            if not host.active:
                return f"{name} is no longer the active controller" if name in step.sent or attempts else \
                    f"{name} was not the active controller"
            if name in step.sent or host.action != "none":
                progress[name] = "swact sent; waiting for the role to move"
                await self.pause()
                continue
            if attempts > step.max_retries:
                raise StepFailed(f"swact from {name} refused: {last}")
            if attempts:
                await self.pause(self.retry_delay(step) or None)
            attempts += 1
            await self._mark(step, name, True)
            reply = await self._request("roost.cmd.host.swact", inv.HostSwact(host=name), timeout=_left(step))
            if not reply.ok and reply.reason != NO_ANSWER:
                last = "inventory does not answer" if is_unhandled(reply) else reply.reason or "refused"
                progress[name] = f"swact refused: {last}"
                await self._mark(step, name, False)          # refused: it did not happen, it may be asked again

    async def _update(self, name: str, target: msg.Release, step: Step, progress: dict[str, str]) -> str:
        host = await self._retrying(lambda: self.host(name), progress, name)
        if host.agent is None:
            raise StepFailed(f"{name} has no agent to install {target.name}")
        agent = host.agent
        sent = False
        while True:
            reply = await self._request("roost.cmd.agent.release", msg.AgentReleaseQuery(),
                                        subject=f"roost.cmd.agent.{agent}.release")
            if not reply.ok:
                silent = is_unhandled(reply) or reply.reason == NO_ANSWER
                progress[name] = "its agent does not answer" if silent else f"agent: {reply.reason}"
                await self.pause()
                continue
            running = msg.AgentRelease.model_validate(reply.result).release
            if _same(running, target):
                progress[name] = f"on {target.name}"
                return f"{name} installed {target.name}" if sent else f"{name} was on {target.name} already"
            progress[name] = f"installing {target.name}"
            reply = await self._request("roost.cmd.agent.update", msg.AgentUpdate(release=target),
                                        subject=f"roost.cmd.agent.{agent}.update", timeout=_left(step))
            sent = True
            if reply.ok:
                continue                                  # read back what the agent runs now
            if is_unhandled(reply) or reply.reason == NO_ANSWER:
                progress[name] = "its agent does not answer"
                await self.pause()
                continue
            raise StepFailed(f"{name}: {reply.reason}")

    async def _reboot(self, name: str, step: Step, resumed: bool, progress: dict[str, str]) -> str:
        host = await self._retrying(lambda: self.host(name), progress, name)
        if resumed and step.started_at is not None and host.uptime_seconds is not None:
            since = (_now() - step.started_at).total_seconds()
            if host.uptime_seconds < since:
                return f"{name} rebooted (up {host.uptime_seconds} s)"
        reply = await self._request("roost.cmd.host.reboot", inv.HostCommand(host=name), timeout=_left(step))
        if not reply.ok:
            raise StepFailed(f"reboot of {name} refused: {reply.reason}")
        return f"{name} rebooting"


class _Retry(Exception):
    """Not now (the other service does not answer): look again after a pause, until the step's deadline."""


def _left(step: Step) -> float:
    return max(1.0, (apply.deadline(step, _now()) - _now()).total_seconds())


class Executor:
    """Drives the strategy in the database until it is final (or not running).  One at a time across replicas:
    the caller holds ``store.LOCK_KEY``."""

    def __init__(self, pool: asyncpg.Pool, bus: Bus, outbox: Outbox, runner: StepRunner, *,
                 boundary: Callable[[str, StepRef, Step], object] | None = None, abort_poll: float = 0.5) -> None:
        self.pool = pool
        self.bus = bus
        self.outbox = outbox
        self.runner = runner
        self.boundary = boundary
        self.abort_poll = abort_poll
        self.abort_wake = asyncio.Event()
        self._current: Strategy | None = None
        runner.remember = self._remember

    async def _remember(self) -> None:
        """Commit the strategy as it is (a step's ``sent`` list), before a command that must not go twice."""
        if self._current is not None:
            await self._save(self._current, [])

    async def _boundary(self, name: str, ref: StepRef, step: Step) -> None:
        failpoint(f"orchestrator.{name}")
        failpoint(f"orchestrator.{name}.{step.name}")
        if self.boundary is not None:
            outcome = self.boundary(name, ref, step)
            if inspect.isawaitable(outcome):
                await outcome

    async def run(self) -> str | None:
        """Apply (or go on applying) the strategy; its state when nothing more is to run, None: there is none."""
        async with self.pool.acquire() as conn:
            loaded = await store.load(conn)
        if loaded is None:
            metrics.record_strategy_state(None)
            return None
        s = self._current = loaded.strategy
        if s.state not in apply.RUNNING_STATES:
            metrics.record_strategy_state(s.state)
            return s.state
        await self._save(s, apply.settle(s, _now()))
        while (ref := apply.current(s)) is not None:
            step = s.step(ref)
            resumed = step.result == "inprogress"
            if resumed:
                log.info("strategy: resuming a step that started before a restart", stage=ref.stage_id,
                         step=step.name, hosts=step.entity_names, started_at=str(step.started_at))
            else:
                await self._save(s, apply.start_step(s, ref, _now()))
                await self._boundary("step_started", ref, step)
            log.info("strategy: step", phase=ref.phase, stage=ref.stage_id, step=step.name, hosts=step.entity_names)
            outcome = await self._run_step(s, ref, step, resumed)
            await self._boundary("step_acted", ref, step)
            await self._save(s, apply.finish_step(s, ref, outcome, _now()))
            assert step.started_at is not None and step.finished_at is not None
            metrics.record_step(step.name, outcome.result, (step.finished_at - step.started_at).total_seconds())
            log.info("strategy: step done", step=step.name, hosts=step.entity_names, result=outcome.result,
                     reason=outcome.reason, state=s.state)
            await self._boundary("step_finished", ref, step)
        if s.state in apply.FINAL_STATES:
            log.info("strategy: done", state=s.state, reason=s.reason)
        return s.state

    async def _save(self, s: Strategy, transitions: list[Transition]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if s.state == "applying" and await store.abort_requested(conn, s.uuid):
                transitions = transitions + apply.request_abort(s, _now())
            if transitions or s.state in apply.RUNNING_STATES:
                await store.save(conn, s, transitions, self.bus, self.outbox)
        metrics.record_strategy_state(s.state)
        for t in transitions:
            if t.kind == "strategy" and t.state in apply.FINAL_STATES:
                metrics.record_strategy_end(t.state)

    async def _abort_seen(self, s: Strategy) -> None:
        """Return once an abort is asked for this strategy (or it was deleted)."""
        while True:
            async with self.pool.acquire() as conn:
                if await store.abort_requested(conn, s.uuid) is not False:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.abort_wake.wait(), self.abort_poll)
            self.abort_wake.clear()

    async def _run_step(self, s: Strategy, ref: StepRef, step: Step, resumed: bool) -> Outcome:
        stage = s.stage(ref)
        watched = [] if any(t.name == REBOOT_HOSTS for t in stage.steps) else stage.hosts   # rebooting: expected
        work = asyncio.create_task(self.runner.run(s, step, resumed=resumed, hosts=watched),
                                   name=f"strategy-step-{step.name}")
        watch = asyncio.create_task(self._abort_seen(s)) if s.state == "applying" else None
        try:
            waiting: set[asyncio.Task[Any]] = {work} if watch is None else {work, watch}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch in done and not work.done():
                watch.result()
                await self._save(s, [])                       # takes up the abort (StrategyGone: deleted)
                if step.name in apply.PASSIVE_STEPS:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    return Outcome("aborted", "cut short by the abort")
            return await work
        finally:
            for task in (work, watch):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
