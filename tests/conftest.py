"""The suite's order: the modules with slow tests (``pytest.mark.slow``) first, the rest after, each group in the
usual order.  scripts/test runs the suite on pytest-xdist workers a whole module at a time (``--dist loadfile
--no-loadscope-reorder``): started first, the long modules (a `roost up --demo`, a controller pair, a dcsync
site) run beside the many short ones instead of being left for last, when the other workers have nothing to do.
No test depends on the order."""

from __future__ import annotations

import pytest

from services.core.loop import LoopFactory, loop_factory, loop_name


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_modules)      # stable: False sorts first


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, LoopFactory]:
    """Every async test runs on the event loop roost's processes run on (uvloop; ``ROOST_EVENT_LOOP=asyncio``
    runs the suite on asyncio's own)."""
    return {loop_name(): loop_factory()}
