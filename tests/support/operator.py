"""The operator's side of a test site: commands over the bus as the `roost` command sends them."""

from __future__ import annotations

from typing import Any

from services.core.bus.bus import Bus
from tests.support.waiting import wait_until


async def ok(operator: Bus, type: str, data: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send a command and return its result; fail the test with the reason when it is not accepted."""
    reply = await operator.request(operator.envelope(type, data), timeout=timeout)
    assert reply.ok, reply.reason
    return dict(reply.result)


async def unlock_when_online(operator: Bus, name: str, *, in_service: tuple[str, ...] = ("available",),
                             timeout: float = 40.0) -> None:
    """Wait for the host's agent (hello and hardware), unlock it, wait until it is in service."""
    async def ready() -> bool:
        host = await ok(operator, "roost.cmd.host.show", {"host": name})
        return bool(host["availability"] == "online" and host["inventoried"])

    async def serving() -> bool:
        return (await ok(operator, "roost.cmd.host.show", {"host": name}))["availability"] in in_service

    await wait_until(ready, timeout, f"{name} online and inventoried (its agent's hello and hardware)")
    await ok(operator, "roost.cmd.host.unlock", {"host": name})
    await wait_until(serving, timeout, f"{name} unlocked and {' or '.join(in_service)}")
