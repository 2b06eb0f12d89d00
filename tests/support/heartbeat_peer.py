"""A host agent's heartbeat side in a process of its own: one or more :class:`HeartbeatResponder` instances.

    python -m tests.support.heartbeat_peer            # run from the repository root (``ip netns exec`` works)

Tests and benchmarks start it as a real agent process (in another network namespace, or to be killed with
SIGKILL).  The configuration comes as one JSON line on stdin, so the master key is never in argv or the
environment (where ``ps`` and ``/proc/<pid>/environ`` would show it)::

    {"key": "<hex>", "generation": 1, "cluster": "<hex>", "state": "/dir",
     "monitors": [1] | null, "log_level": "INFO",
     "hosts": [{"node_id": 20, "hostname": "worker-0", "paths": [[0, "10.1.2.2", 2223], ...]}, ...]}

Once every responder is bound it prints one JSON line on stdout, the address each path's socket got::

    {"ready": true, "pid": 1234, "hosts": {"worker-0": {"0": ["10.1.2.2", 2223], ...}}}

(or ``{"ready": false, "error": "..."}`` and exit status 1 when a socket cannot be bound), then answers
heartbeats until stdin reaches end of file (the parent closed it or died) or SIGTERM / SIGINT, and stops
the responders.  Logs go to stderr as JSON lines (structlog, as in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path as FsPath
from typing import Any

from services.core.logging import configure_logging
from services.heartbeat.keys import MasterKey
from services.heartbeat.model import Path
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import PathSpec


def responders(config: dict[str, Any]) -> list[HeartbeatResponder]:
    master = MasterKey(int(config.get("generation", 1)), bytes.fromhex(config["key"]))
    cluster_id = bytes.fromhex(config["cluster"])
    state = FsPath(config["state"])
    monitors = config.get("monitors")
    out = []
    for host in config["hosts"]:
        specs = [PathSpec(Path(int(p)), str(address), int(port)) for p, address, port in host["paths"]]
        out.append(HeartbeatResponder(node_id=int(host["node_id"]), cluster_id=cluster_id, master_key=master,
                                      paths=specs, state_dir=state / str(host["hostname"]),
                                      hostname=str(host["hostname"]),
                                      monitors=[int(m) for m in monitors] if monitors is not None else None))
    return out


async def _stdin_closed() -> None:
    """Returns when stdin reaches end of file (never, when stdin is not a pipe)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):
        await asyncio.Event().wait()
    while await reader.read(4096):
        pass


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main() -> int:
    config = json.loads(sys.stdin.readline())
    configure_logging("json", str(config.get("log_level", "INFO")), stream=sys.stderr)
    peers = responders(config)
    started: list[HeartbeatResponder] = []
    try:
        try:
            for responder in peers:
                await responder.start()
                started.append(responder)
        except OSError as e:
            _say({"ready": False, "error": f"{type(e).__name__}: {e}"})
            return 1
        _say({"ready": True, "pid": os.getpid(),
              "hosts": {r.hostname: {str(p.value): list(r.address(p)) for p in r.specs} for r in peers}})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        eof = asyncio.create_task(_stdin_closed())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (eof, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return 0
    finally:
        for responder in started:
            await responder.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
