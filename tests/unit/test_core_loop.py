"""The event loop roost's processes run on (services/core/loop.py): uvloop unless told otherwise, a clear error for a
loop that cannot be had, and the CLI and the test suite on it."""

from __future__ import annotations

import asyncio
import builtins
import os
import subprocess
import sys
from typing import Any

import pytest
import uvloop

from services.core.loop import ENV, EventLoopUnavailable, loop_factory, loop_name, run_on_roost_loop


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert loop_name() == "uvloop"
    assert run_on_roost_loop(_loop_type()) is uvloop.Loop


@pytest.mark.parametrize("choice", ["asyncio", "ASYNCIO", " asyncio "])
def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    monkeypatch.setenv(ENV, choice)
    assert loop_name() == "asyncio"
    used = run_on_roost_loop(_loop_type())
    assert not issubclass(used, uvloop.Loop)
    assert issubclass(used, asyncio.BaseEventLoop)


def test_an_explicit_choice_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "asyncio")
    assert run_on_roost_loop(_loop_type(), choice="uvloop") is uvloop.Loop


def test_a_name_that_is_no_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(EventLoopUnavailable, match="ROOST_EVENT_LOOP='trio': expected auto, uvloop or asyncio"):
        loop_factory()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert loop_name("auto") == "asyncio"
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(EventLoopUnavailable, match="uvloop is not installed"):
        loop_name("uvloop")


async def test_the_suite_runs_on_roosts_loop() -> None:
    """tests/conftest.py hands pytest-asyncio the same factory (uvloop, unless ROOST_EVENT_LOOP says asyncio)."""
    expected = uvloop.Loop if loop_name() == "uvloop" else asyncio.BaseEventLoop
    assert isinstance(asyncio.get_running_loop(), expected)


def test_the_cli_says_which_loop_it_cannot_run() -> None:
    env = {**os.environ, ENV: "tokio"}
    done = subprocess.run([sys.executable, "-m", "services.cli", "alarm", "list"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "roost: ROOST_EVENT_LOOP='tokio': expected auto, uvloop or asyncio" in done.stderr
    assert "Traceback" not in done.stderr
