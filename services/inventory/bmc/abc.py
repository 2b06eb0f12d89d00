"""What inventory asks of a BMC, whatever drives it.

A ``Bmc`` drives one BMC (one Redfish service, one system on it).  Every call has a deadline of its
own and raises a ``BmcError`` subclass saying what went wrong, never a library's exception:

* ``BmcUnreachable``: no answer (connection refused, timeout, TLS failure, 5xx);
* ``BmcAuthFailed``: the BMC refuses the credentials (401 / 403);
* ``BmcUnsupported``: the BMC does not offer what was asked (no such reset type, no boot override);
* ``BmcBusy``: a power action on this BMC is still in progress (a reset during a reset).

Power actions use StarlingX maintenance's graceful / immediate pairs and only reset types the BMC
advertises (``ResetType@Redfish.AllowableValues``):

=============  ==================  ===================================
action         first               then / instead
=============  ==================  ===================================
power-on       On                  ForceOn when On is not offered
power-off      GracefulShutdown    ForceOff once ``graceful_timeout`` passes with the power still on
reset          ForceRestart        GracefulRestart when ForceRestart is not offered
reboot         GracefulRestart     ForceRestart when GracefulRestart is not offered
reinstall      boot override Pxe, Once; then ForceRestart (or On when the system is off)
=============  ==================  ===================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import SecretStr

from schemas.inventory import Hardware, PowerState

BmcActionName = Literal["power-on", "power-off", "reset", "reboot", "reinstall"]


class BmcError(Exception):
    """A BMC call failed; the message says what and never carries a credential."""


class BmcUnreachable(BmcError):
    pass


class BmcAuthFailed(BmcError):
    pass


class BmcUnsupported(BmcError):
    pass


class BmcBusy(BmcError):
    pass


@dataclass(frozen=True, slots=True)
class BmcEndpoint:
    """Where a BMC is and how to log in.  ``repr`` never shows the password."""

    address: str                       # http(s)://host[:port]
    username: str
    password: SecretStr = field(repr=False)
    system_id: str | None = None       # None: the BMC's only system
    verify_tls: bool = True
    timeout: float = 5.0               # seconds, per HTTP request


@dataclass(frozen=True, slots=True)
class BmcSystem:
    """What a reachable BMC says about its system."""

    system_id: str
    power_state: PowerState
    manufacturer: str = ""
    model: str = ""
    serial: str = ""
    macs: tuple[str, ...] = ()         # its NICs' MAC addresses, lower case
    reset_types: tuple[str, ...] = ()  # the reset types it advertises


@dataclass(frozen=True, slots=True)
class ActionReport:
    """What a power action did: the Redfish reset types sent, in order (e.g. GracefulShutdown, ForceOff)."""

    action: BmcActionName
    sent: tuple[str, ...]
    power_state: PowerState


class Bmc(Protocol):
    async def check(self) -> BmcSystem:
        """Reach the BMC and log in; the system it drives.  The audit calls this every minute."""
        ...

    async def power_state(self) -> PowerState: ...

    async def perform(self, action: BmcActionName, *, wait: float | None = None) -> ActionReport:
        """Carry out a power action.  With ``wait``, poll (at most that many seconds) until the power
        state it leads to is observed; ``power_state`` in the report is the last one read."""
        ...

    async def hardware(self) -> Hardware:
        """Processors, memory, storage and NICs as far as the BMC offers them (``source="redfish"``)."""
        ...

    async def close(self) -> None: ...


BmcFactory = Callable[[BmcEndpoint], Bmc]
