"""``HeadTimes``: since when the oldest change a cursor lacks has waited (the lag rule of the sync status)."""

from __future__ import annotations

import random

from services.dcsync.source import HeadTimes


def test_a_cursor_waits_since_the_advance_that_first_went_past_it() -> None:
    times = HeadTimes()
    times.advanced(0, 0.0)
    times.advanced(3, 10.0)     # changes 1..3 seen at 10
    times.advanced(3, 11.0)     # no advance: nothing recorded
    times.advanced(5, 12.0)     # 4..5 at 12
    assert times.waiting_since(0) == 10.0
    assert times.waiting_since(2) == 10.0
    assert times.waiting_since(3) == 12.0
    assert times.waiting_since(5) is None, "at the head: nothing waits"
    assert times.waiting_since(9) is None


def test_what_is_dropped_never_makes_a_cursor_look_newer_than_the_oldest_advance_kept() -> None:
    times = HeadTimes(horizon=100.0, limit=4)
    for i in range(1, 11):
        times.advanced(i * 10, float(i))
    assert times.seqs == [70, 80, 90, 100], "at most `limit` advances"
    assert times.waiting_since(5) == 7.0, "older than what is kept: waiting at least since the oldest kept"
    times.advanced(110, 500.0)   # past the horizon everything older goes, the newest stays
    assert times.seqs == [110] and times.waiting_since(100) == 500.0 and times.waiting_since(0) == 500.0


def test_waiting_since_matches_a_brute_force_answer() -> None:
    rng = random.Random(7)
    for _ in range(300):
        times = HeadTimes(horizon=1e9, limit=10**6)
        seen: list[tuple[int, float]] = []
        head, now = 0, 0.0
        for _ in range(rng.randint(1, 30)):
            head += rng.choice((0, 0, 1, 3, 10))
            now += rng.random()
            times.advanced(head, now)
            if not seen or head > seen[-1][0]:
                seen.append((head, now))
        cursor = rng.randint(0, head + 2)
        expected = next((t for h, t in seen if h > cursor), None)
        assert times.waiting_since(cursor) == expected, (seen, cursor)
