"""Failpoints: named places where a test can make a process die, to prove crash safety.

A failpoint fires when the environment variable ``ROOST_FAILPOINT`` names it (several names may be
given, separated by commas).  Firing means ``SIGKILL`` to the process itself: no ``finally`` blocks,
no flushing, no goodbye to the broker or the database, exactly what a power cut or the OOM killer does.

Failpoints in the code base (grep for ``failpoint(``):

* ``relay.after_confirm``: the outbox relay got the broker's confirmation of a batch and has not yet
  marked its rows sent.
"""

from __future__ import annotations

import os
import signal

ENV = "ROOST_FAILPOINT"


def armed(name: str) -> bool:
    """Whether the failpoint ``name`` is armed in this process's environment."""
    value = os.environ.get(ENV, "")
    return bool(value) and name in (part.strip() for part in value.split(","))


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if the failpoint ``name`` is armed; otherwise do nothing."""
    if armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
