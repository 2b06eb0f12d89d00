"""The store's uuids, drawn many at a time: as text, exactly what ``str(uuid.UUID(bytes=..., version=4))``
makes of the same 16 random bytes."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from services.alarms.store import _Uuids


def _fed(raw: bytes) -> _Uuids:
    uuids = _Uuids(count=1)
    uuids._pool, uuids._at = raw, 0
    return uuids


@given(st.binary(min_size=16, max_size=16))
def test_text_is_the_uuid_of_the_same_bytes(raw: bytes) -> None:
    text = _fed(raw).text()
    assert text == str(_fed(raw)()) == str(uuid.UUID(bytes=raw, version=4))
    assert uuid.UUID(text).version == 4 and uuid.UUID(text).variant == uuid.RFC_4122


def test_draws_differ_across_refills() -> None:
    uuids = _Uuids(count=4)
    drawn = [uuids.text() for _ in range(50)] + [str(uuids()) for _ in range(50)]
    assert len(set(drawn)) == 100
