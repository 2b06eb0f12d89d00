"""The process's heap after start-up (pure CPython gc calls, no I/O)."""

from __future__ import annotations

import gc


def settle_startup_heap() -> int:
    """Move what start-up left on the heap (modules, pydantic schemas, the catalogue, connections) out of the
    cyclic garbage collector's reach, once every service of the process has started; returns how many objects.

    Those objects live as long as the process.  Left in the collector's oldest generation, every full
    collection walks them all (a few hundred thousand), and a busy service triggers one every few seconds.
    What is frozen is still freed by reference counting; only cycles among it are never collected.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
