"""The event loop roost's processes run on: uvloop where it is installed (a dependency everywhere but Windows),
else asyncio's own.  ``ROOST_EVENT_LOOP`` chooses: ``uvloop``, ``asyncio``, or ``auto`` (the default).

uvloop runs the same asyncio programs with its transports, timers and callbacks in C (libuv).  The services
spend much of their time there: every message, query and HTTP request is a few reads, writes and callbacks.
In interleaved runs of the alarms service's group-commit path (``bench/alarms_bench.py``, ``bench/README.md``) it
took 4 to 15% off the CPU each op costs the service's process.  The test suite runs on the loop chosen here too
(``tests/conftest.py``).

Two differences matter when starting programs on uvloop: ``create_subprocess_exec`` takes no ``user`` /
``group`` / ``extra_groups``, and it does not close our other descriptors in the child.  A program that leaves a
daemon behind (``pg_ctl start``) is therefore run by ``subprocess`` in a thread (``services.core.embedded.
postgres``), so that the daemon holds no copy of a pipe we read to its end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, cast

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]
ENV = "ROOST_EVENT_LOOP"
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class EventLoopUnavailable(RuntimeError):
    """``ROOST_EVENT_LOOP`` names a loop this Python cannot run, or is not a loop's name."""


def loop_name(choice: str | None = None) -> LoopName:
    """The loop ``choice`` (default: ``$ROOST_EVENT_LOOP``, else ``auto``) means here."""
    wanted = (choice if choice is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if wanted not in ("auto", "uvloop", "asyncio"):
        raise EventLoopUnavailable(f"{ENV}={wanted!r}: expected auto, uvloop or asyncio")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        if wanted == "uvloop":
            raise EventLoopUnavailable(f"{ENV}=uvloop, but uvloop is not installed ({exc})") from exc
        return "asyncio"
    return "uvloop"


def loop_factory(choice: str | None = None) -> LoopFactory:
    """A callable that makes a new event loop of the chosen kind (``loop_name``)."""
    if loop_name(choice) == "uvloop":
        import uvloop

        return cast(LoopFactory, uvloop.new_event_loop)
    return asyncio.new_event_loop


def run_on_roost_loop(main: Coroutine[Any, Any, T], *, choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
