"""A dcsync source starts at the heads of the change log, read as one value per lane, whatever the log holds;
the changes after them come from the cache, the older ones from the database (real PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from services.dcsync.source import Source
from services.dcsync.tables import LANES, MAIN_LANE, REVOCATION_LANE
from services.dcsync.tracking import Tracker
from tests.support.dcsync_site import mini_db, mini_spec
from tests.support.postgres import pool_on

pytestmark = pytest.mark.postgres

USERS = 6_000          # more changes than one read of the log (5,000) holds


async def test_a_source_starts_at_the_heads_without_reading_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    async with mini_db("roost_src_start") as url, pool_on(url) as central:
        first = Source(mini_spec(), url)
        await first.start()                 # installs the capture triggers
        await first.stop()
        await central.execute(f"""INSERT INTO "user" (id, enabled) SELECT 'u' || n, true
                                   FROM generate_series(1, {USERS}) AS n""")
        await central.execute("INSERT INTO revocation_event (user_id, issued_before) VALUES ('u1', now())")
        logged = {r["lane"]: int(r["head"]) for r in await central.fetch(
            "SELECT lane, max(seq) AS head FROM roost_dcsync.change_log GROUP BY lane")}
        assert set(logged) == {MAIN_LANE, REVOCATION_LANE}

        read: list[int] = []
        changes = Tracker.changes

        async def counted(self: Tracker, conn: Any, lane: str, after: int, limit: int) -> Any:
            batch = await changes(self, conn, lane, after, limit)
            read.append(len(batch))
            return batch

        monkeypatch.setattr(Tracker, "changes", counted)
        source = Source(mini_spec(), url)
        await source.start()
        try:
            assert sum(read) == 0, "no change of the log read to start"
            assert source.heads == logged

            # a cursor below the heads is served from the database, in order, a page at a time
            page = await source.changes(MAIN_LANE, 0, 100)
            assert [c.seq for c in page] == sorted(c.seq for c in page) and len(page) == 100

            # the next change is read alone, and served from the cache
            await central.execute("""INSERT INTO "user" (id, enabled) VALUES ('late', true)""")
            read.clear()
            assert await source.refresh()
            assert sum(read) == 1
            assert source.heads[MAIN_LANE] > logged[MAIN_LANE]
            read.clear()
            fresh = await source.changes(MAIN_LANE, logged[MAIN_LANE], 100)
            assert [c.pk for c in fresh] == [{"id": "late"}] and read == []
            assert all(source.heads[lane] >= logged[lane] for lane in LANES)
        finally:
            await source.stop()
