"""The notification row the alarm store writes for every op is built without models (it is on the hot path):
it must hold exactly the bytes the models would render, whatever the alarm."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from services.alarms.catalogue import AlarmType, Severity
from services.alarms.model import Alarm
from services.alarms.store import _notification, _notification_values
from services.alarms.webhooks.formats import EventKind
from services.alarms.webhooks.store import notification_values


@dataclass(frozen=True)
class FakeEnvelope:
    """What the store reads of an envelope here: its id and time."""

    id: str
    time: datetime


def alarm(*, reason: str = "Heartbeat lost on mgmt", when: datetime | None = None, flags: bool = False,
          severity: Severity = Severity.MAJOR) -> Alarm:
    at = when or datetime(2026, 11, 21, 8, 0, 0, 123456, tzinfo=UTC)
    return Alarm(uuid=uuid.uuid4(), alarm_id="950.003", entity_type_id="host.network",
                 entity_instance_id="host=controller-0.network=mgmt", timestamp=at, severity=severity,
                 reason_text=reason, alarm_type=AlarmType.COMMUNICATION, probable_cause="loss-of-signal",
                 proposed_repair_action="Check the cable", service_affecting=flags, suppression=not flags,
                 inhibit_alarms=flags, mgmt_affecting=flags, degrade_affecting=not flags, created_at=at,
                 updated_at=at + timedelta(seconds=1))


def same(a: Alarm, kind: EventKind, suppressed: bool, version: int = 3, time: datetime | None = None) -> None:
    envelope = FakeEnvelope(str(uuid.uuid4()), time or datetime.now(UTC))
    slow = notification_values(_notification(envelope, a, version, kind, suppressed))  # type: ignore[arg-type]
    fast = _notification_values(envelope, a, version, kind, suppressed)  # type: ignore[arg-type]
    assert fast == slow


def test_every_kind_and_suppression() -> None:
    for kind in EventKind:
        for suppressed in (False, True):
            for flags in (False, True):
                same(alarm(flags=flags), kind, suppressed)


def test_times_without_microseconds_and_in_other_zones() -> None:
    same(alarm(when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)), EventKind.RAISED, False,
         time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    plus_two = timezone(timedelta(hours=2))
    same(alarm(when=datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=plus_two)), EventKind.CHANGED, True,
         time=datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=plus_two))


@settings(max_examples=60, deadline=None)
@given(reason=st.text(max_size=255).filter(lambda t: "\x00" not in t), severity=st.sampled_from(list(Severity)),
       kind=st.sampled_from(list(EventKind)), version=st.integers(1, 2**40))
def test_any_reason_text(reason: str, severity: Severity, kind: EventKind, version: int) -> None:
    same(alarm(reason=reason, severity=severity), kind, False, version)


# -- the roost.alarm.* event of every op, built the same way (without models) -------------------------


def same_event(a: Alarm, kind: EventKind, version: int = 3) -> None:
    """``_event_data`` is what the event models dump, and the envelope made of it is what the registry makes."""
    from schemas.catalog import load as load_registry
    from schemas.envelope import Principal, Role
    from services.alarms.model import Change, FieldChange, SetOutcome
    from services.alarms.store import AlarmStore, Origin, StoredAlarm, _clear_event, _event_data, _set_event
    from services.core.db.outbox import Outbox

    owner = "roost/heartbeat"
    if kind is EventKind.CLEARED:
        cleared, slow_event = _clear_event(StoredAlarm(a, owner, version - 1), version, "cleared", a.updated_at)
        fast = _event_data(kind, cleared, version, owner, cause="cleared")
    else:
        changes = (FieldChange("severity", "minor", a.severity.value),) if kind is EventKind.CHANGED else ()
        outcome = SetOutcome(Change.RAISED if kind is EventKind.RAISED else Change.CHANGED, a, None, changes)
        _, dicts, slow_event, _ = _set_event(outcome, a, version, owner)
        fast = _event_data(kind, a, version, owner, changes=dicts)
    assert fast == slow_event.model_dump(mode="json")
    registry = load_registry()
    store = AlarmStore(None, Outbox("alarms"), registry)  # type: ignore[arg-type]
    origin = Origin(owner, "corr-1", "cause-1", Principal(name="ops", role=Role.ADMIN))
    kind_type = f"roost.alarm.{kind.value}"
    made = store._event_envelope(kind_type, fast, origin, f"alarm/{a.uuid}")
    reference = store._envelope(kind_type, slow_event, origin, f"alarm/{a.uuid}")
    assert registry.validate(made) == registry.validate(reference)
    ignored = {"id", "time"}
    assert made.model_dump(mode="json", exclude=ignored) == reference.model_dump(mode="json", exclude=ignored)
    assert Outbox("alarms").message(made).body.startswith(b'{"specversion":"1.0","id":"')


def test_the_event_of_every_kind() -> None:
    for kind in EventKind:
        for flags in (False, True):
            same_event(alarm(flags=flags), kind)
    plus_two = timezone(timedelta(hours=2))
    same_event(alarm(when=datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=plus_two)), EventKind.CHANGED, 9)
    same_event(alarm(when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)), EventKind.RAISED, 1)
