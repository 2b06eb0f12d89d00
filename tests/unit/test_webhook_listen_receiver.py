"""`roost webhook listen`'s receiver without the network: what it answers and prints for signed, retried,
forged and malformed deliveries in both formats, with a rotation's two secrets."""

from __future__ import annotations

import json
import time

import pytest

from services.alarms.webhooks.formats import (
    AlarmFields,
    EventKind,
    Notification,
    alertmanager_payload,
    dumps_body,
    roost_payload,
)
from services.alarms.webhooks.signing import generate_secret, sign_headers
from services.cli.webhook_listen import Receiver, describe


def note(event: EventKind = EventKind.RAISED) -> Notification:
    alarm = AlarmFields(uuid="00000000-0000-4000-8000-000000000001", alarm_id="950.002",
                        entity_instance_id="host=worker-2", timestamp="2026-11-21T10:00:00Z", severity="critical",
                        reason_text="worker-2 failed")
    return Notification(event=event, version=1 if event is EventKind.RAISED else 2, alarm=alarm)


def test_describe_both_formats_and_anything_else() -> None:
    assert describe(dumps_body(roost_payload(note()))) == \
        "alarm.raised 950.002 critical host=worker-2 v1: worker-2 failed"
    assert describe(dumps_body(roost_payload(note(EventKind.CLEARED)))).startswith("alarm.cleared 950.002")
    am = describe(dumps_body(alertmanager_payload(note(), receiver="r")))
    assert am == "alertmanager firing 950.002 critical host=worker-2: worker-2 failed"
    assert describe(b"\xff not json") == "(not JSON, 10 bytes)"
    assert describe(b"[1]") == "(JSON, not an object)"
    assert describe(json.dumps({"b": 1, "a": 2}).encode()) == "(JSON with keys a, b)"


def test_receive_verifies_with_either_secret_tells_retries_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    old, new = generate_secret(), generate_secret()
    receiver = Receiver([old, new], tolerance=300, show_body=False)
    body = dumps_body(roost_payload(note()))
    now = int(time.time())
    signed = sign_headers([new], "msg_1", now, body)
    assert receiver.receive(signed, body, "127.0.0.1") == 204
    assert receiver.receive(sign_headers([old], "msg_1", now + 5, body), body, "127.0.0.1") == 204
    assert receiver.receive(sign_headers([generate_secret()], "msg_2", now, body), body, "10.0.0.9") == 401
    assert receiver.receive(signed, body + b"x", "127.0.0.1") == 401
    assert receiver.receive({k.upper(): v for k, v in signed.items()}, body, "127.0.0.1") == 204
    assert receiver.receive(sign_headers([new], "msg_3", now - 1000, body), body, "127.0.0.1") == 401
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["verified", "verified", "REJECTED", "REJECTED", "verified",
                                                   "REJECTED"]
    assert "id=msg_1 alarm.raised 950.002" in lines[0] and "(again)" not in lines[0]
    assert "id=msg_1 (again)" in lines[1]
    assert "(no signature matches) id=msg_2 from 10.0.0.9" in lines[2]
    assert "(webhook-timestamp is too old) id=msg_3" in lines[5]
    assert (receiver.verified, receiver.rejected) == (3, 3)
    assert old not in "".join(lines) and new not in "".join(lines)
