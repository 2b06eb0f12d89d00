"""An envelope's body on the bus is the bytes pydantic writes for it (``model_dump_json(exclude_none=True)``),
written by orjson (``codec.envelope_json``) or, for what orjson cannot write the same way, by pydantic."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.envelope import Envelope, Principal, Role
from services.core.bus.codec import decode, encode, envelope_json

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
offsets = st.sampled_from([UTC, timezone(timedelta(0)), timezone(timedelta(hours=5, minutes=30)),
                           timezone(-timedelta(hours=8)), None])
instants = st.builds(lambda d, tz: d.replace(tzinfo=tz),
                     st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), offsets)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text | instants
           | st.floats(allow_nan=True, allow_infinity=True))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=12)
aware = instants.filter(lambda d: d.tzinfo is not None)
optional = st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=30)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    principal = draw(st.none() | st.builds(Principal, name=st.text(min_size=1, max_size=10),
                                           role=st.sampled_from(Role), kind=st.sampled_from(["user", "service",
                                                                                             "agent"])))
    return Envelope(source="roost/test", type="roost.test.happened", time=draw(aware), subject=draw(optional),
                    causationid=draw(optional), principal=principal, deadline=draw(st.none() | aware),
                    idempotencykey=draw(optional), dataversion=draw(st.integers(1, 3)),
                    data=draw(st.dictionaries(text, values, max_size=5)))


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_the_bytes_are_pydantics(envelope: Envelope) -> None:
    assert envelope_json(envelope) == envelope.model_dump_json(exclude_none=True).encode()


class _Model(BaseModel):
    x: int = 1


@pytest.mark.parametrize("data", [
    {"model": _Model()},
    {"raw": b"bytes"},
    {"money": Decimal("1.10")},
    {"big": 2**70},
    {"keys": {1: "one"}},
    {"tags": {"b", "a"}},
])
def test_what_orjson_cannot_write_is_left_to_pydantic(data: dict[str, Any]) -> None:
    envelope = Envelope.model_construct(id="e-1", source="roost/test", type="roost.test.happened",
                                        time=datetime(2026, 11, 22, tzinfo=UTC), correlationid="c-1", data=data)
    assert envelope_json(envelope) == envelope.model_dump_json(exclude_none=True).encode()


def test_a_message_decodes_to_the_envelope_it_was_encoded_from() -> None:
    envelope = Envelope(source="roost/alarms", type="roost.alarm.raised", subject="alarm/x",
                        principal=Principal(name="ops", role=Role.ADMIN),
                        data={"reason_text": "a \"quoted\" ünïcödé\u2028🚨", "n": 1, "t": "2026-11-22T10:00:00Z"})
    message = encode(envelope)
    assert decode(message.body) == envelope
    assert json.loads(message.body)["principal"] == {"name": "ops", "role": "admin", "kind": "user"}
