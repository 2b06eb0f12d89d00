"""Fencing a controller through its BMC: Redfish ``ForceOff``, then ``PowerState`` read back as ``Off``.

The heartbeat service never reads inventory's tables: it learns each controller's BMC from inventory's
``roost.host.bmc_access`` events, whose ``sealed`` field is the endpoint (address, user, password)
sealed with the fencing key both services hold (``services.inventory.bmc.vault.FencingSealer``).  An
empty ``sealed`` means the BMC was removed.  Events are applied by version, newest wins.

:meth:`Fencer.fence` is what the controller pair's ``FencePeer`` effect runs.  It succeeds only when the
BMC reads the system back as ``Off`` within ``timeout``; a host with no BMC known, a BMC that refuses the
credentials, does not answer (each request is bounded by the endpoint's timeout, the whole fence by
``timeout``) or never reports ``Off`` is a failed fence, with the reason, and the pair does not take over.
A system already ``Off`` is fenced without a reset (it cannot be running).  Passwords never reach a log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from schemas.inventory import BmcAccess, PowerState
from services.inventory.bmc.abc import BmcEndpoint, BmcError
from services.inventory.bmc.redfish import RedfishBmc
from services.inventory.bmc.vault import FencingSealer, VaultError

__all__ = ["FenceResult", "Fencer"]

log = structlog.get_logger("roost.heartbeat.fencing")

POLL = 0.25


@dataclass(frozen=True, slots=True)
class FenceResult:
    hostname: str
    ok: bool
    detail: str
    seconds: float


def _redfish(endpoint: BmcEndpoint) -> RedfishBmc:
    return RedfishBmc(endpoint, poll_interval=POLL)


class Fencer:
    def __init__(self, sealer: FencingSealer, *, timeout: float = 20.0, request_timeout: float = 3.0,
                 factory: Callable[[BmcEndpoint], RedfishBmc] = _redfish) -> None:
        self.sealer = sealer
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.factory = factory
        self._endpoints: dict[str, BmcEndpoint] = {}
        self._versions: dict[str, int] = {}

    def known(self) -> list[str]:
        return sorted(self._endpoints)

    def learn(self, access: BmcAccess) -> None:
        """A ``roost.host.bmc_access`` event (older versions than one applied are ignored)."""
        if access.version <= self._versions.get(access.entity_id, 0):
            return
        self._versions[access.entity_id] = access.version
        if not access.sealed:
            self._endpoints.pop(access.hostname, None)
            log.info("fencing: BMC removed", host=access.hostname)
            return
        try:
            endpoint = self.sealer.unseal(access.entity_id, access.key_id, access.sealed)
        except (VaultError, ValueError) as exc:
            self._endpoints.pop(access.hostname, None)
            log.error("fencing: cannot open the BMC access of a controller: it cannot be fenced",
                      host=access.hostname, error=str(exc))
            return
        self._endpoints[access.hostname] = BmcEndpoint(endpoint.address, endpoint.username, endpoint.password,
                                                       endpoint.system_id, endpoint.verify_tls,
                                                       timeout=min(endpoint.timeout, self.request_timeout))
        log.info("fencing: BMC known", host=access.hostname, bmc=endpoint.address)

    async def fence(self, hostname: str) -> FenceResult:
        started = time.monotonic()

        def result(ok: bool, detail: str) -> FenceResult:
            outcome = FenceResult(hostname, ok, detail, round(time.monotonic() - started, 3))
            (log.info if ok else log.error)("fence", host=hostname, ok=ok, detail=detail, seconds=outcome.seconds)
            return outcome

        endpoint = self._endpoints.get(hostname)
        if endpoint is None:
            return result(False, f"no BMC is known for {hostname}: it cannot be fenced")
        bmc = self.factory(endpoint)
        try:
            async with asyncio.timeout(self.timeout):
                if await bmc.power_state() == "off":
                    return result(True, "the power state reads Off already")
                await bmc.send_reset("ForceOff")
                while await self._read(bmc) != "off":  # noqa: ASYNC110 - polling a remote BMC, nothing to await
                    await asyncio.sleep(POLL)
                return result(True, "ForceOff sent, power state read back as Off")
        except TimeoutError:
            return result(False, f"the BMC of {hostname} did not report Off within {self.timeout:g} s")
        except BmcError as exc:
            return result(False, f"the BMC of {hostname}: {exc}")
        finally:
            await bmc.close()

    @staticmethod
    async def _read(bmc: RedfishBmc) -> PowerState:
        try:
            return await bmc.power_state()
        except BmcError:
            return "unknown"
