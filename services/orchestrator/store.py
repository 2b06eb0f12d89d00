"""The orchestrator's tables (``migrations/0001_strategies.sql``): the one update strategy, its phases,
stages and steps.

``save`` writes the whole strategy in the caller's transaction, with the events of its transitions into
the outbox, and bumps the strategy's ``version`` once per transition (each event carries its own).  The
executor commits a step's ``started_at`` before the step acts: that row is the durable marker a restarted
orchestrator resumes from.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from schemas import orchestrator as msg
from services.core.bus.bus import Bus
from services.core.db.outbox import Outbox
from services.core.db.pool import AnyConnection
from services.orchestrator.apply import Phase, Strategy, Transition
from services.orchestrator.strategy import Release, Stage, Step

SCHEMA = "orchestrator"
LOCK_KEY = 0x526F6F73_0006          # pg advisory lock: one executor across replicas


class StrategyExists(Exception):
    """There is a strategy already (one at a time)."""


class StrategyGone(Exception):
    """The strategy was deleted (with force) while it was being worked on."""


@dataclass(frozen=True, slots=True)
class Loaded:
    strategy: Strategy
    version: int
    abort_requested: bool


def new_uuid() -> str:
    return str(uuidlib.uuid4())


async def load(conn: AnyConnection, *, for_update: bool = False) -> Loaded | None:
    """The strategy, if there is one."""
    row = await conn.fetchrow(f"SELECT * FROM {SCHEMA}.strategies" + (" FOR UPDATE" if for_update else ""))
    if row is None:
        return None
    sid = row["uuid"]
    phases = {r["phase"]: r for r in await conn.fetch(
        f"SELECT * FROM {SCHEMA}.strategy_phases WHERE strategy = $1", sid)}
    stages = await conn.fetch(f"SELECT * FROM {SCHEMA}.strategy_stages WHERE strategy = $1 ORDER BY phase, stage_id",
                              sid)
    steps = await conn.fetch(f"SELECT * FROM {SCHEMA}.strategy_steps WHERE strategy = $1 "
                             "ORDER BY phase, stage_id, step_id", sid)
    by_stage: dict[tuple[str, int], list[Step]] = {}
    for r in steps:
        by_stage.setdefault((r["phase"], r["stage_id"]), []).append(Step(
            r["name"], r["timeout"], list(r["entity_names"]), list(r["entity_uuids"]), max_retries=r["max_retries"],
            retry_delay=r["retry_delay"], result=r["result"], reason=r["reason"], started_at=r["started_at"],
            finished_at=r["finished_at"], sent=list(r["sent"])))

    def phase(name: str) -> Phase | None:
        p = phases.get(name)
        if p is None:
            return None
        return Phase(name, [Stage(r["name"], by_stage.get((name, r["stage_id"]), []), current_step=r["current_step"],  # type: ignore[arg-type]
                                  result=r["result"], reason=r["reason"]) for r in stages if r["phase"] == name],
                     current_stage=p["current_stage"], result=p["result"], reason=p["reason"])

    release = json.loads(row["release"])
    apply_phase = phase("apply") or Phase("apply", [])
    strategy = Strategy(uuid=str(sid), release=Release(release["name"], release["version"], release["reboot_required"]),
                        options=msg.StrategyOptions.model_validate_json(row["options"]), state=row["state"],
                        apply_phase=apply_phase, created_at=row["created_at"], updated_at=row["updated_at"],
                        abort_phase=phase("abort"), current_phase=row["current_phase"],
                        skipped=json.loads(row["skipped"]), reason=row["reason"], stop_at_stage=row["stop_at_stage"])
    return Loaded(strategy, int(row["version"]), bool(row["abort_requested"]))


def _release(r: Release) -> str:
    return json.dumps({"name": r.name, "version": r.version, "reboot_required": r.reboot_required})


async def insert(conn: AnyConnection, s: Strategy, bus: Bus, outbox: Outbox,
                 transitions: Sequence[Transition] = ()) -> int:
    """Store a new strategy (``StrategyExists`` if there is one) with the events of ``transitions``."""
    try:
        await conn.execute(
            f"""INSERT INTO {SCHEMA}.strategies (uuid, state, reason, release, options, current_phase, skipped,
                                                 version, created_at, updated_at)
                VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb, 1, $8, $9)""",
            s.uuid, s.state, s.reason, _release(s.release), s.options.model_dump_json(), s.current_phase,
            json.dumps(s.skipped), s.created_at, s.updated_at)
    except asyncpg.UniqueViolationError:
        raise StrategyExists("a strategy exists already: delete it first (one strategy at a time)") from None
    await _write_phases(conn, s)
    return await _events(conn, s, 0, transitions, bus, outbox)


async def save(conn: AnyConnection, s: Strategy, transitions: Sequence[Transition], bus: Bus, outbox: Outbox) -> int:
    """Write ``s`` as it is now with the events of ``transitions``; its new version.  ``StrategyGone`` if it
    was deleted meanwhile."""
    version = await conn.fetchval(f"SELECT version FROM {SCHEMA}.strategies WHERE uuid = $1 FOR UPDATE", s.uuid)
    if version is None:
        raise StrategyGone(f"strategy {s.uuid} was deleted")
    new = await _events(conn, s, int(version), transitions, bus, outbox)
    await conn.execute(
        f"""UPDATE {SCHEMA}.strategies SET state = $2, reason = $3, current_phase = $4, version = $5, updated_at = $6,
                                           stop_at_stage = $7
            WHERE uuid = $1""", s.uuid, s.state, s.reason, s.current_phase, new, s.updated_at, s.stop_at_stage)
    await _write_phases(conn, s)
    return new


async def _write_phases(conn: AnyConnection, s: Strategy) -> None:
    await conn.execute(f"DELETE FROM {SCHEMA}.strategy_phases WHERE strategy = $1", s.uuid)
    phases = [p for p in (s.apply_phase, s.abort_phase) if p is not None]
    await conn.executemany(
        f"INSERT INTO {SCHEMA}.strategy_phases (strategy, phase, current_stage, result, reason) "
        "VALUES ($1, $2, $3, $4, $5)", [(s.uuid, p.name, p.current_stage, p.result, p.reason) for p in phases])
    await conn.executemany(
        f"INSERT INTO {SCHEMA}.strategy_stages (strategy, phase, stage_id, name, current_step, result, reason) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(s.uuid, p.name, i, st.name, st.current_step, st.result, st.reason)
         for p in phases for i, st in enumerate(p.stages)])
    await conn.executemany(
        f"""INSERT INTO {SCHEMA}.strategy_steps (strategy, phase, stage_id, step_id, name, entity_names, entity_uuids,
                                                 timeout, max_retries, retry_delay, result, reason, started_at,
                                                 finished_at, sent)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)""",
        [(s.uuid, p.name, i, j, t.name, t.entity_names, t.entity_uuids, t.timeout, t.max_retries, t.retry_delay,
          t.result, t.reason, t.started_at, t.finished_at, t.sent)
         for p in phases for i, st in enumerate(p.stages) for j, t in enumerate(st.steps)])


async def _events(conn: AnyConnection, s: Strategy, version: int, transitions: Sequence[Transition], bus: Bus,
                  outbox: Outbox) -> int:
    envelopes = []
    for t in transitions:
        version += 1
        data = msg.StrategyTransition(entity_id=s.uuid, version=version, state=t.state, phase=t.phase,
                                      stage_id=t.stage_id, stage_name=t.stage_name, step_id=t.step_id,
                                      step_name=t.step_name, entity_names=list(t.entity_names), result=t.result,
                                      reason=t.reason)
        envelopes.append(bus.envelope(t.event_type, data, subject=f"strategy/{s.uuid}"))
    if envelopes:
        await outbox.add_many(conn, envelopes)
    return max(version, 1)


async def request_abort(conn: AnyConnection) -> Loaded | None:
    """Flag the operator's abort for the executor; the strategy as it is."""
    await conn.execute(f"UPDATE {SCHEMA}.strategies SET abort_requested = true")
    return await load(conn)


async def abort_requested(conn: AnyConnection, uuid: str) -> bool | None:
    """Whether an abort was asked; None: the strategy is gone (deleted with force)."""
    value = await conn.fetchval(f"SELECT abort_requested FROM {SCHEMA}.strategies WHERE uuid = $1", uuid)
    return None if value is None else bool(value)


async def delete(conn: AnyConnection, uuid: str) -> bool:
    return (await conn.execute(f"DELETE FROM {SCHEMA}.strategies WHERE uuid = $1", uuid)) != "DELETE 0"


def view(loaded: Loaded) -> msg.StrategyView:
    s = loaded.strategy

    def phase_view(p: Phase) -> msg.PhaseView:
        return msg.PhaseView(name=p.name, result=p.result, reason=p.reason, current_stage=p.current_stage,
                             total_stages=len(p.stages), stages=[
                                 msg.StageView(stage_id=i, name=st.name, result=st.result, reason=st.reason,
                                               current_step=st.current_step, steps=[
                                                   msg.StepView(step_id=j, name=t.name, entity_names=t.entity_names,
                                                                timeout=t.timeout, result=t.result, reason=t.reason,
                                                                started_at=t.started_at, finished_at=t.finished_at)
                                                   for j, t in enumerate(st.steps)])
                                 for i, st in enumerate(p.stages)])

    reason = s.reason
    if loaded.abort_requested and s.state == "applying":
        reason = "abort requested: the step in flight finishes first"
    elif s.paused:
        reason = f"stage {s.apply_phase.current_stage - 1} applied; apply the next stage or the rest, or abort"
    return msg.StrategyView(uuid=s.uuid, state=s.state, reason=reason, release=msg.Release(
        name=s.release.name, version=s.release.version, reboot_required=s.release.reboot_required),
        options=s.options, current_phase=s.current_phase, apply_phase=phase_view(s.apply_phase),
        abort_phase=phase_view(s.abort_phase) if s.abort_phase is not None else None, skipped=s.skipped,
        created_at=s.created_at, updated_at=s.updated_at, version=loaded.version, stop_at_stage=s.stop_at_stage)
