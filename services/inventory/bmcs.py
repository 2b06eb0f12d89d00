"""The inventory service's BMCs: one long-lived driver per host, passwords opened from the vault only to
build an endpoint, and the BMC access sealed for the heartbeat service.

A host's ``Bmc`` is kept while its endpoint stays the same (the Redfish driver serialises calls per BMC
and knows which power action is in progress, so the audit and the actions must share it) and replaced,
the old one closed, when the address, username, password or system changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from schemas import inventory as msg
from services.inventory.bmc.abc import (
    ActionReport,
    Bmc,
    BmcActionName,
    BmcEndpoint,
    BmcError,
    BmcFactory,
    BmcSystem,
)
from services.inventory.bmc.audit import AuditResult, AuditTarget, audit_once
from services.inventory.bmc.vault import FencingSealer, PasswordVault
from services.inventory.store import HostRow

log = structlog.get_logger("roost.inventory.bmc")


def default_factory(endpoint: BmcEndpoint) -> Bmc:
    from services.inventory.bmc.redfish import RedfishBmc
    return RedfishBmc(endpoint)


@dataclass
class _Held:
    endpoint: BmcEndpoint
    bmc: Bmc


class BmcManager:
    def __init__(self, vault: PasswordVault, sealer: FencingSealer, factory: BmcFactory | None = None, *,
                 request_timeout: float = 5.0, audit_timeout: float = 30.0) -> None:
        self.vault = vault
        self.sealer = sealer
        self.factory = factory or default_factory
        self.request_timeout = request_timeout
        self.audit_timeout = audit_timeout
        self._held: dict[str, _Held] = {}

    def encrypt(self, host_uuid: str, password: str) -> tuple[bytes, str]:
        ciphertext, key_id = self.vault.encrypt(host_uuid, password)
        return ciphertext, key_id

    def endpoint(self, row: HostRow) -> BmcEndpoint | None:
        """The row's BMC endpoint, password decrypted; None when it has no BMC or no password."""
        if not row.bmc_provisioned or row.bmc_password is None or row.bmc_key_id is None:
            return None
        password = self.vault.decrypt(row.uuid, row.bmc_password, row.bmc_key_id)
        return BmcEndpoint(address=row.bmc_address, username=row.bmc_username, password=password,
                           system_id=row.bmc_system_id, verify_tls=row.bmc_verify_tls, timeout=self.request_timeout)

    async def bmc(self, row: HostRow) -> Bmc | None:
        endpoint = self.endpoint(row)
        held = self._held.get(row.uuid)
        if held is not None and held.endpoint == endpoint:
            return held.bmc
        if held is not None:
            await self._close(self._held.pop(row.uuid))
        if endpoint is None:
            return None
        bmc = self.factory(endpoint)
        self._held[row.uuid] = _Held(endpoint, bmc)
        return bmc

    async def forget(self, host_uuid: str) -> None:
        held = self._held.pop(host_uuid, None)
        if held is not None:
            await self._close(held)

    async def perform(self, row: HostRow, action: BmcActionName, *, wait: float | None) -> ActionReport:
        bmc = await self.bmc(row)
        if bmc is None:
            raise BmcError(f"{row.hostname or row.uuid} has no BMC with a password")
        return await bmc.perform(action, wait=wait)

    async def audit(self, rows: Sequence[HostRow]) -> list[AuditResult]:
        """Check every row's BMC once (the minute audit); each check is timed for Prometheus."""
        targets: list[AuditTarget] = []
        drivers: dict[BmcEndpoint, Bmc] = {}
        for row in rows:
            bmc = await self.bmc(row)         # the held driver, refreshed if the endpoint changed
            if bmc is not None:
                endpoint = self._held[row.uuid].endpoint
                drivers[endpoint] = bmc
                targets.append(AuditTarget(row.uuid, row.hostname, endpoint))
        return await audit_once(targets, drivers.__getitem__, close=False, timeout=self.audit_timeout)

    def sealed_access(self, row: HostRow) -> msg.BmcAccess | None:
        """``roost.host.bmc_access`` for a controller (sealed; empty when its BMC is gone); None otherwise."""
        if row.personality != "controller" or row.hostname is None:
            return None
        endpoint = self.endpoint(row)
        if endpoint is None:
            return msg.BmcAccess(entity_id=row.uuid, version=row.version, hostname=row.hostname,
                                 key_id=self.sealer.key_id, sealed="")
        key_id, sealed = self.sealer.seal(row.uuid, endpoint)
        return msg.BmcAccess(entity_id=row.uuid, version=row.version, hostname=row.hostname, key_id=key_id,
                             sealed=sealed)

    async def close(self) -> None:
        held, self._held = list(self._held.values()), {}
        for h in held:
            await self._close(h)

    @staticmethod
    async def _close(held: _Held) -> None:
        with contextlib.suppress(Exception):
            await held.bmc.close()


__all__ = ["BmcManager", "BmcSystem", "default_factory"]
