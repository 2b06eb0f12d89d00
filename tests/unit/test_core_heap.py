"""settle_startup_heap: what start-up made is out of the cyclic collector's generations, and still usable."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from services.core.heap import settle_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()       # the rest of the test session collects as before


def test_objects_made_before_are_frozen_and_later_ones_collected(unfrozen: None) -> None:
    startup = {"schemas": [object() for _ in range(10)]}
    frozen = settle_startup_heap()
    assert frozen >= 10 and gc.get_freeze_count() == frozen
    tracked = {id(o) for o in gc.get_objects()}
    assert id(startup) not in tracked            # a full collection no longer walks it
    startup["schemas"].append(object())          # still an ordinary object
    cycle: list[object] = []
    cycle.append(cycle)                          # made after start-up: collected as usual
    assert id(cycle) in {id(o) for o in gc.get_objects()}
    del cycle
    assert gc.collect() >= 1
