"""One endpoint's source database at the system controller: its tables, its change log, its digests.

``start`` reflects the database and checks the sync configuration against it (``ConfigError`` saying
what does not fit), then checks the capture triggers: the tables whose trigger is missing or stale are
returned (the service raises 950.104 for them) and, with ``repair_triggers``, re-installed; the re-digest
that comes with it logs every write the missing triggers let through as a change, so no write is lost.

The heads (the last change per lane) are refreshed on a ``NOTIFY`` from the triggers and by a poll; the
changes since the oldest subcloud's cursor are kept in memory (``recent``), so a new change fanned out to a
thousand subclouds is read from the database once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from services.core.db.pool import AnyConnection
from services.dcsync.tables import LANES, EndpointSpec, ResolvedTable
from services.dcsync.tracking import Change, Redigested, Root, Tracker
from services.dcsync.tracking_sql import Place

log = structlog.get_logger("roost.dcsync.source")

RECENT_MAX = 50_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The controller's digests as of one head (every change up to ``head`` included, none after)."""

    heads: dict[str, int]
    roots: dict[str, Root]

    @property
    def head(self) -> int:
        return max(self.heads.values(), default=0)


class _Recent:
    """The newest changes of one lane, complete after ``covers_from``."""

    def __init__(self) -> None:
        self.covers_from = 0
        self.changes: list[Change] = []
        self.seqs: list[int] = []

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else self.covers_from

    def extend(self, changes: list[Change]) -> None:
        self.changes.extend(changes)
        self.seqs.extend(c.seq for c in changes)
        if len(self.changes) > RECENT_MAX:
            cut = len(self.changes) - RECENT_MAX
            self.covers_from = self.seqs[cut - 1]
            del self.changes[:cut]
            del self.seqs[:cut]

    def after(self, seq: int, limit: int) -> list[Change] | None:
        if seq < self.covers_from:
            return None
        i = bisect.bisect_right(self.seqs, seq)
        return self.changes[i:i + limit]


class HeadTimes:
    """When each advance of one lane's head was first seen (monotonic clock): so that a cursor tells since when
    the oldest change it lacks has waited.  Kept for ``horizon`` seconds and at most ``limit`` advances; a
    cursor older than what is kept has waited at least since the oldest advance kept."""

    def __init__(self, *, horizon: float = 3600.0, limit: int = 65536) -> None:
        self.horizon = horizon
        self.limit = limit
        self.seqs: list[int] = []
        self.times: list[float] = []

    def advanced(self, head: int, now: float) -> None:
        if self.seqs and head <= self.seqs[-1]:
            return
        self.seqs.append(head)
        self.times.append(now)
        cut = max(len(self.seqs) - self.limit, bisect.bisect_left(self.times, now - self.horizon))
        cut = min(cut, len(self.seqs) - 1)          # the newest advance always stays
        if cut > 0:
            del self.seqs[:cut]
            del self.times[:cut]

    def waiting_since(self, cursor: int) -> float | None:
        """When the first change after ``cursor`` was seen; None when nothing after it was."""
        i = bisect.bisect_right(self.seqs, cursor)
        return self.times[i] if i < len(self.seqs) else None


class Source:
    def __init__(self, spec: EndpointSpec, url: str, place: Place | None = None, *,
                 repair_triggers: bool = True) -> None:
        self.spec = spec
        self.endpoint = str(spec.endpoint)
        self.url = url
        self.place = place or Place()
        self.tracker = Tracker(self.place)
        self.repair_triggers = repair_triggers
        self.tables: tuple[ResolvedTable, ...] = ()
        self.heads: dict[str, int] = dict.fromkeys(LANES, 0)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._recent = {lane: _Recent() for lane in LANES}
        self._head_times = {lane: HeadTimes() for lane in LANES}
        self._snapshot: Snapshot | None = None
        self._purged: dict[str, int] | None = None
        self._natural: dict[tuple[str, tuple[str, ...]], tuple[dict[str, int], dict[str, dict[str, Any]]]] = {}
        self._refresh_lock = asyncio.Lock()
        self.on_change: Callable[[], None] = lambda: None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"the {self.endpoint} source has not started")
        return self._pool

    async def start(self) -> list[str]:
        """Connect, check the configuration and the triggers.  Returns the tables whose triggers were missing."""
        from services.dcsync.tables import resolve
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=8)
        self.tables = resolve(self.spec, await self.tracker.reflect(self._pool))
        missing = await self.check_triggers()
        self._listener = await asyncpg.connect(self.url)
        await self._listener.add_listener(self.place.channel, self._notified)
        await self.refresh()
        for lane in LANES:   # the cache starts at the head: older changes are read from the database
            self._recent[lane].covers_from = self.heads[lane]
        return missing

    async def check_triggers(self) -> list[str]:
        """The synced tables whose trigger is missing or stale; re-installed when ``repair_triggers``."""
        stale = await self.tracker.missing_triggers(self.pool, self.tables, capture=True)
        installed = set(await self.tracker.installed(self.pool))
        missing = [t for t in stale if t in installed]     # a first install is not a missing trigger
        if stale and (self.repair_triggers or len(missing) < len(stale)):
            report = await self.install()
            for r in report:
                if r.differences:
                    log.warning("changes the capture triggers missed are logged now", endpoint=self.endpoint,
                                table=r.table, added=r.added, changed=r.changed, removed=r.removed)
        return missing

    async def install(self) -> list[Redigested]:
        async with self.pool.acquire() as conn:
            report = await self.tracker.install(conn, self.tables, capture=True)
        return report.redigested

    async def redigest_all(self) -> list[Redigested]:
        """The backstop: every table's row states recomputed from its rows; what differs is logged as changes."""
        out = []
        async with self.pool.acquire() as conn:
            for t in self.tables:
                out.append(await self.tracker.redigest(conn, t.name))
        return out

    async def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    def _notified(self, *_: object) -> None:
        self.on_change()

    async def refresh(self) -> bool:
        """Read the new changes of every lane; True when a head moved."""
        async with self._refresh_lock:
            moved = False
            for lane in LANES:
                recent = self._recent[lane]
                while True:
                    batch = await self.tracker.changes(self.pool, lane, recent.last, 5000)
                    if not batch:
                        break
                    recent.extend(batch)
                    moved = True
                self.heads[lane] = max(self.heads[lane], recent.last)
                self._head_times[lane].advanced(self.heads[lane], time.monotonic())
            return moved

    def waiting_since(self, cursors: dict[str, int]) -> float | None:
        """Since when (monotonic) the oldest change after ``cursors`` has waited; None when they are at the head.
        Only changes seen by this service count: the first ones after a start count from the start."""
        since = [t for lane in LANES
                 if (t := self._head_times[lane].waiting_since(cursors.get(lane, 0))) is not None]
        return min(since, default=None)

    @property
    def head(self) -> int:
        return max(self.heads.values())

    async def changes(self, lane: str, after: int, limit: int) -> list[Change]:
        cached = self._recent[lane].after(after, limit)
        if cached is not None:
            return cached
        return await self.tracker.changes(self.pool, lane, after, limit)

    async def natural_key_index(self, table: str, columns: Sequence[str], pk: Sequence[str],
                                key: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, Any]]:
        """The table's rows as natural key (by ``key``) -> primary key, read once per head: a thousand
        subclouds joining at once compare against one read, not a thousand."""
        heads = dict(self.heads)
        cached = self._natural.get((table, tuple(columns)))
        if cached is not None and cached[0] == heads:
            return cached[1]
        index = {key(k): p for k, p in await self.tracker.natural_keys(self.pool, table, columns, pk)}
        if heads == self.heads:
            self._natural[(table, tuple(columns))] = (heads, index)
        return index

    async def purged_through(self) -> dict[str, int]:
        """Per lane, the last change purged from the log (read again after a purge, the only thing that moves
        it)."""
        if self._purged is None:
            self._purged = await self.tracker.purged_through(self.pool)
        return self._purged

    def purged(self) -> None:
        self._purged = None

    def missed(self, cursors: dict[str, int], purged: dict[str, int]) -> bool:
        """A subcloud at these cursors lacks changes the log no longer holds: in some lane, its cursor is below
        the last change purged (a lane at its head lacks nothing)."""
        return any(c < purged.get(lane, 0) and c < self.heads.get(lane, 0) for lane, c in cursors.items())

    @contextlib.asynccontextmanager
    async def snapshot_conn(self) -> AsyncIterator[tuple[AnyConnection, dict[str, int]]]:
        """A read-only repeatable-read transaction and the heads (per lane) it sees."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn, {lane: await self.tracker.head(conn, lane) for lane in LANES}

    async def snapshot(self) -> Snapshot:
        """Table roots as of the head (cached until the head moves)."""
        cached = self._snapshot
        if cached is not None and cached.heads == self.heads:
            return cached
        async with self.snapshot_conn() as (conn, heads):
            roots = await self.tracker.roots(conn, [t.name for t in self.tables])
        snap = Snapshot(heads, roots)
        if heads == self.heads:
            self._snapshot = snap
        return snap
