"""The dispatcher's pure policy: Retry-After, full-jitter backoff, what each answer leads to."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from services.alarms.webhooks.dispatcher import (
    DispatcherSettings,
    Outcome,
    backoff_delay,
    decide,
    parse_retry_after,
    retryable,
)

NOW = 1_800_000_000.0


def run(status: int | None, retry_after: str | None = None, error: str | None = None, *, attempts: int = 1,
        age: float = 1.0, max_age: float = 3600.0, rng: random.Random | None = None) -> Outcome:
    return decide(status, retry_after, error, attempts=attempts, age=age, max_age=max_age, min_backoff=1.0,
                  max_backoff=60.0, max_retry_after=600.0, now=NOW, rng=rng or random.Random(1))


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 0 ", NOW) == 0.0
    date = format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(90.0)
    past = format_datetime(datetime.fromtimestamp(NOW - 90, UTC), usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) is None


def test_full_jitter_backoff_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, base=1.0, cap=60.0, rng=rng) for _ in range(50)]
        assert all(0.0 <= s <= ceiling for s in samples)
    spread = [backoff_delay(10, base=1.0, cap=60.0, rng=rng) for _ in range(200)]
    assert min(spread) < 15 and max(spread) > 45  # jitter over the whole range


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_delivered(status: int) -> None:
    assert run(status).state == "delivered"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_4xx_dead_at_once(status: int) -> None:
    outcome = run(status)
    assert outcome.state == "dead" and f"HTTP {status}" in outcome.reason
    assert not outcome.max_age_reached


@pytest.mark.parametrize("status", [301, 408, 429, 500, 502, 503, 504])
def test_retryable(status: int) -> None:
    assert retryable(status)
    outcome = run(status, attempts=3)
    assert outcome.state == "retry" and 0.0 <= outcome.delay <= 4.0


def test_network_error_retried() -> None:
    outcome = run(None, error="ConnectError: refused")
    assert outcome.state == "retry" and outcome.reason == "ConnectError: refused"


def test_retry_after_honoured_and_capped() -> None:
    assert run(429, "30").delay == 30.0
    assert run(503, "30").delay == 30.0
    assert run(429, "99999").delay == 600.0
    assert run(429, "garbage", attempts=1).delay <= 1.0


def test_max_age() -> None:
    outcome = run(500, attempts=9, age=3600.5)
    assert outcome.state == "dead" and outcome.max_age_reached
    assert outcome.reason.startswith("max age 3600s reached after 9 attempt(s), last: HTTP 500")
    # the last retry is scheduled no later than the max age
    near = run(500, attempts=20, age=3599.0)
    assert near.state == "retry" and near.delay <= 1.0
    # a 2xx after the max age still counts as delivered
    assert run(200, age=99999.0).state == "delivered"


def test_settings_checked() -> None:
    assert DispatcherSettings().effective_lease == 40.0
    with pytest.raises(ValueError, match="lease"):
        DispatcherSettings(timeout=5, lease=5).check()
    with pytest.raises(ValueError):
        DispatcherSettings(per_subscription=0).check()
