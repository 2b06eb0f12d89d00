"""Waiting for a fact in tests, never for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_until(condition: Callable[[], object | Awaitable[object]], timeout: float = 30.0,
                     what: str = "condition") -> None:
    """Poll ``condition`` (plain or async) until it is truthy, at most ``timeout`` seconds, then fail saying
    what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
