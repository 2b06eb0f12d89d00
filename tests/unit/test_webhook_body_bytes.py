"""Webhook bodies are compact JSON with sorted keys in UTF-8 (``formats.dumps_body``, by orjson): the bytes the
standard library writes with ``sort_keys=True, separators=(",", ":"), ensure_ascii=False``, for any value of the
kinds a body holds (no floats: none has one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.alarms.webhooks.formats import dumps_body, rfc3339


def reference(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


text = st.text(st.characters(exclude_categories=("Cs",)))      # every code point but lone surrogates
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(values)
def test_the_bytes_are_the_standard_librarys(value: Any) -> None:
    assert dumps_body(value) == reference(value)


@pytest.mark.parametrize("value", [
    {"b": 1, "a": {"d": [1, "x"], "c": None}},
    "\x00\x01\x1f\x7f\"\\/\b\f\n\r\t\u2028\u2029é漢字😀",
    {"ä": 1, "a": 2, "z": 3, "Z": 4, "😀": 5, "é": 6},
])
def test_escapes_and_key_order(value: Any) -> None:
    assert dumps_body(value) == reference(value)


def test_a_lone_surrogate_is_refused_not_written() -> None:
    with pytest.raises(TypeError):
        dumps_body({"reason_text": "\ud800"})


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
       st.sampled_from([UTC, timezone(timedelta(0)), None]))
def test_a_time_in_utc_is_written_as_rfc3339_writes_it(when: datetime, zone: timezone | None) -> None:
    value = when.replace(tzinfo=zone)
    assert dumps_body({"t": value}) == reference({"t": rfc3339(value)})
