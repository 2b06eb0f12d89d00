"""The orchestrator service: the Kubernetes side of host lock and unlock (update strategies come later).

Commands served (group ``orchestrator``, several at once: one host's drain never holds up another's):

* ``roost.cmd.hostservices.disable`` (``action`` ``lock`` or ``force-lock``): inventory asks it before it
  locks a host and waits for the answer: cordon the host's node, evict its pods, taint it
  (``services.orchestrator.maintenance``);
* ``roost.cmd.hostservices.enable`` (``action`` ``unlock``): after an unlock: untaint, uncordon.

The answer is ``HostServicesResult(done, detail)``; a lock that cannot drain the node in time answers
``done=False`` with the pods that blocked it, and leaves the node in service.

Kubernetes is configured by ``OrchestratorSettings`` (``ROOST_ORCHESTRATOR_KUBECONFIG`` or
``ROOST_ORCHESTRATOR_KUBE_IN_CLUSTER``); without it every command is done, saying that the node steps were
skipped.  ``build_orchestrator()`` builds the service from those settings.

The service keeps no tables yet (its schema holds the outbox and inbox every service gets).  A drain in
flight when the service stops is not rolled back: its command was not acknowledged, so the broker delivers
it again and the next instance carries on from the node as it finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog
from fastapi import APIRouter
from pydantic import BaseModel

from schemas import orchestrator as msg
from services.core.bus.abc import ConsumerOptions
from services.core.bus.bus import Message, Reject
from services.core.host import ServiceContext
from services.orchestrator.kube import KubeApi, KubernetesApi
from services.orchestrator.maintenance import HostMaintenance
from services.orchestrator.settings import OrchestratorSettings, load_orchestrator_settings

log = structlog.get_logger("roost.orchestrator")

NAME = "orchestrator"
GROUP = "orchestrator"
HOST_SERVICES = "roost.cmd.hostservices.>"
DISABLE = "roost.cmd.hostservices.disable"
ENABLE = "roost.cmd.hostservices.enable"


class OrchestratorService:
    """The ``orchestrator`` component.  ``kube``: a ready ``KubeApi`` (else one is made from the settings)."""

    name = NAME
    migrations: Path | None = None

    def __init__(self, settings: OrchestratorSettings | None = None, *, kube: KubeApi | None = None) -> None:
        self.settings = settings if settings is not None else OrchestratorSettings()
        self._kube = kube
        self._own_kube = False
        self._maintenance: HostMaintenance | None = None

    @property
    def maintenance(self) -> HostMaintenance:
        if self._maintenance is None:
            raise RuntimeError("the orchestrator service has not started")
        return self._maintenance

    @property
    def consumer_options(self) -> ConsumerOptions:
        """Drains of different hosts at once; a delivery stays unsettled for as long as its drain may take."""
        return ConsumerOptions(concurrency=16, ack_wait=self.settings.drain_timeout + 60.0)

    async def start(self, ctx: ServiceContext) -> None:
        if self._kube is None:
            self._kube = await connect(self.settings)
            self._own_kube = self._kube is not None
        s = self.settings
        self._maintenance = HostMaintenance(self._kube, drain_timeout=s.drain_timeout,
                                            poll_interval=s.drain_poll_interval, grace_seconds=s.eviction_grace_seconds,
                                            taint_key=s.lock_taint_key, skip_wait_after=s.drain_skip_wait_after)
        if self._kube is None:
            log.info("no Kubernetes configured: lock and unlock will skip the node steps")
        else:
            log.info("host maintenance drives Kubernetes", kubernetes=self._kube.description,
                     drain_timeout=s.drain_timeout)
        await ctx.bus.serve(HOST_SERVICES, GROUP, self.command, options=self.consumer_options)

    async def stop(self) -> None:
        if self._kube is not None and self._own_kube:
            kube, self._kube, self._own_kube = self._kube, None, False
            await kube.close()

    def routers(self) -> Sequence[APIRouter]:
        return []

    async def command(self, message: Message) -> BaseModel:
        """``roost.cmd.hostservices.*``: carry out the host's node steps and say whether they are done."""
        data = message.data
        envelope = message.envelope
        if not isinstance(data, msg.HostServices):
            raise Reject(f"{envelope.type} is not a host-services command")
        if envelope.type == DISABLE and data.action in ("lock", "force-lock"):
            result = await self.maintenance.disable(data.hostname, force=data.action == "force-lock",
                                                    issued=envelope.time, deadline=envelope.deadline)
        elif envelope.type == ENABLE and data.action == "unlock":
            result = await self.maintenance.enable(data.hostname, issued=envelope.time)
        else:
            raise Reject(f"{envelope.type} does not take the action {data.action!r}")
        return msg.HostServicesResult(done=result.done, detail=result.detail)


async def connect(settings: OrchestratorSettings) -> KubeApi | None:
    """The Kubernetes API the settings name; None when none is configured."""
    if settings.kubeconfig is not None:
        return await KubernetesApi.from_kubeconfig(settings.kubeconfig, context=settings.kube_context,
                                                   request_timeout=settings.kube_request_timeout)
    if settings.kube_in_cluster:
        return await KubernetesApi.in_cluster(request_timeout=settings.kube_request_timeout)
    return None


def build_orchestrator(settings: OrchestratorSettings | None = None) -> OrchestratorService:
    """The orchestrator as ``roost up`` runs it: configured from ``ROOST_ORCHESTRATOR_*`` unless ``settings``
    are given.  Raises ``services.core.settings.ConfigError`` (one readable line) on bad settings."""
    return OrchestratorService(settings if settings is not None else load_orchestrator_settings())
