"""The BMC reachability and credential audit: which alarms to raise and clear (pure), and one round of
checks over many BMCs at once (``audit_once``).

Alarms (``services/alarms/catalogue.yaml``), both ``major``, on the entity ``host=<hostname>.bmc=<bmc>``
where ``<bmc>`` is the host part of the BMC's address (an IPv4 address as it is, a name with every
character outside ``[A-Za-z0-9_-]`` turned into ``-``, since a dot would start a new entity segment):

* 950.004 the BMC does not answer (``BmcUnreachable``, a timeout, or any other BMC error: wrong system
  id, not a Redfish service);
* 950.005 the BMC refuses the credentials (``BmcAuthFailed``).

``decide(result, previous)`` compares this round's result for a host with the previous round's (None
after a restart, when nothing is known) and returns the ``roost.fault.set`` / ``roost.fault.clear``
payloads to publish: a fixed BMC clears its alarm, a changed fault swaps 950.004 and 950.005, a changed
entity (new BMC address or hostname) clears the alarms of the old one, and an unchanged fault with the
same reason publishes nothing.  With no previous result it sets what holds and clears the other, which
is harmless to repeat (the alarms service treats a re-set with the same severity and reason as no change
and a clear of an absent alarm as nothing to do).  ``forget(previous)`` clears a BMC's alarms when the
BMC or its host is removed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import structlog

from schemas.alarms import FaultClear, FaultSet
from services.inventory.bmc.abc import Bmc, BmcAuthFailed, BmcEndpoint, BmcError, BmcFactory, BmcSystem

log = structlog.get_logger("roost.inventory.bmc.audit")

BMC_UNREACHABLE: Final = "950.004"
BMC_AUTH_FAILED: Final = "950.005"
SEVERITY: Final = "major"
REASON_MAX: Final = 255

Outcome = Literal["ok", "unreachable", "auth-failed"]

_ALARM_OF: Final[dict[Outcome, str | None]] = {"ok": None, "unreachable": BMC_UNREACHABLE,
                                               "auth-failed": BMC_AUTH_FAILED}
_NOT_ENTITY_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]+")


def bmc_name(address: str) -> str:
    """The ``<bmc>`` of the entity: the address's host part in the entity id syntax."""
    try:
        host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    except ValueError:
        host = ""
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address):
            return host                          # digit-only segments continue the value: 10.0.0.3
    except ValueError:
        pass
    return _NOT_ENTITY_CHARS.sub("-", host).strip("-") or "redfish"


def bmc_entity(hostname: str, address: str) -> str:
    return f"host={hostname}.bmc={bmc_name(address)}"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 1] + "…"


# -- what was found -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditTarget:
    host_uuid: str
    hostname: str | None                 # None: an unprovisioned host (its uuid names it)
    endpoint: BmcEndpoint

    @property
    def name(self) -> str:
        return self.hostname or self.host_uuid


@dataclass(frozen=True, slots=True)
class AuditResult:
    """One host's BMC check: ``outcome`` and, unless ok, the error's message (never a credential)."""

    host_uuid: str
    hostname: str
    address: str
    outcome: Outcome
    message: str = ""
    system: BmcSystem | None = None
    elapsed: float = 0.0

    @property
    def entity(self) -> str:
        return bmc_entity(self.hostname, self.address)

    @property
    def reachable(self) -> bool:
        """For ``BmcInfo.reachable``: the BMC answered and took the credentials."""
        return self.outcome == "ok"


def classify(error: BaseException | None, *, timeout: float | None = None) -> tuple[Outcome, str]:
    """The outcome of a ``Bmc.check()`` that raised ``error`` (None: it succeeded) and the message to show."""
    if error is None:
        return "ok", ""
    if isinstance(error, BmcAuthFailed):
        return "auth-failed", str(error)
    if isinstance(error, BmcError):
        return "unreachable", str(error)
    if isinstance(error, TimeoutError):
        return "unreachable", f"no answer within {timeout:g}s" if timeout is not None else "no answer in time"
    return "unreachable", f"the check failed: {type(error).__name__}"   # a foreign error's text may hold anything


# -- what to publish ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlarmSet:
    alarm_id: str
    entity_instance_id: str
    severity: str
    reason_text: str

    def fault(self) -> FaultSet:
        return FaultSet.model_validate(self.payload())

    def payload(self) -> dict[str, Any]:
        """The ``roost.fault.set`` data."""
        return {"alarm_id": self.alarm_id, "entity_instance_id": self.entity_instance_id,
                "severity": self.severity, "reason_text": self.reason_text}


@dataclass(frozen=True, slots=True)
class AlarmClear:
    alarm_id: str
    entity_instance_id: str

    def fault(self) -> FaultClear:
        return FaultClear.model_validate(self.payload())

    def payload(self) -> dict[str, Any]:
        """The ``roost.fault.clear`` data."""
        return {"alarm_id": self.alarm_id, "entity_instance_id": self.entity_instance_id}


@dataclass(frozen=True, slots=True)
class AuditDecision:
    """What one host's audit changes: clears first, then sets (publish in this order)."""

    clears: tuple[AlarmClear, ...] = ()
    sets: tuple[AlarmSet, ...] = ()
    reachable: bool | None = None        # for BmcInfo.reachable / last_error
    last_error: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.clears or self.sets)

    def payloads(self) -> list[tuple[str, dict[str, Any]]]:
        """``(message type, data)`` pairs in publishing order."""
        return ([("roost.fault.clear", c.payload()) for c in self.clears]
                + [("roost.fault.set", s.payload()) for s in self.sets])


def _reason(result: AuditResult) -> str:
    if result.outcome == "auth-failed":
        what = f"The BMC of {result.hostname} refuses the configured credentials"
    else:
        what = f"The BMC of {result.hostname} does not answer"
    return _cut(f"{what}: {result.message}" if result.message else what)


def decide(result: AuditResult, previous: AuditResult | None = None) -> AuditDecision:
    """The alarms to clear and set for ``result``, given the ``previous`` round's result for that host."""
    entity = result.entity
    alarm = _ALARM_OF[result.outcome]
    reachable = result.outcome == "ok"
    last_error = None if reachable else _cut(result.message or result.outcome)
    clears: list[AlarmClear] = []
    sets: list[AlarmSet] = []
    if previous is not None and previous.entity != entity:
        clears += [AlarmClear(a, previous.entity) for a in (BMC_UNREACHABLE, BMC_AUTH_FAILED)
                   if previous.outcome != "ok" and a == _ALARM_OF[previous.outcome]]
        previous = None                                  # nothing is known about the new entity
    if previous is None:
        clears += [AlarmClear(a, entity) for a in (BMC_UNREACHABLE, BMC_AUTH_FAILED) if a != alarm]
        if alarm is not None:
            sets.append(AlarmSet(alarm, entity, SEVERITY, _reason(result)))
        return AuditDecision(tuple(clears), tuple(sets), reachable, last_error)
    before = _ALARM_OF[previous.outcome]
    if before is not None and before != alarm:
        clears.append(AlarmClear(before, entity))
    if alarm is not None and (alarm != before or _reason(result) != _reason(previous)):
        sets.append(AlarmSet(alarm, entity, SEVERITY, _reason(result)))
    return AuditDecision(tuple(clears), tuple(sets), reachable, last_error)


def forget(previous: AuditResult) -> AuditDecision:
    """Clear both alarms of a BMC that is gone (host deleted, BMC removed or its address changed)."""
    return AuditDecision(tuple(AlarmClear(a, previous.entity) for a in (BMC_UNREACHABLE, BMC_AUTH_FAILED)))


def decide_all(results: Iterable[AuditResult],
               previous: dict[str, AuditResult]) -> tuple[dict[str, AuditDecision], dict[str, AuditResult]]:
    """``decide`` for a whole round: decisions by host uuid (only the hosts whose alarms change, plus the
    hosts that left the audit) and the new ``previous`` map to keep for the next round."""
    decisions: dict[str, AuditDecision] = {}
    current: dict[str, AuditResult] = {}
    for result in results:
        current[result.host_uuid] = result
        decision = decide(result, previous.get(result.host_uuid))
        if decision.changed:
            decisions[result.host_uuid] = decision
    for uuid, gone in previous.items():
        if uuid not in current:
            decisions[uuid] = forget(gone)
    return decisions, current


# -- one round ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Round:
    factory: BmcFactory
    timeout: float
    close: bool
    semaphore: asyncio.Semaphore


async def _check_one(target: AuditTarget, round_: _Round) -> AuditResult:
    async with round_.semaphore:
        started = time.monotonic()
        error: BaseException | None = None
        system: BmcSystem | None = None
        bmc: Bmc | None = None
        try:
            async with asyncio.timeout(round_.timeout):
                bmc = round_.factory(target.endpoint)
                system = await bmc.check()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            if bmc is not None and round_.close:
                try:
                    async with asyncio.timeout(round_.timeout):
                        await bmc.close()
                except Exception as exc:        # closing is best effort; the verdict stands
                    log.debug("bmc close failed", host=target.name, error=type(exc).__name__)
        outcome, message = classify(error, timeout=round_.timeout)
        result = AuditResult(host_uuid=target.host_uuid, hostname=target.name, address=target.endpoint.address,
                             outcome=outcome, message=message, system=system,
                             elapsed=time.monotonic() - started)
        if outcome != "ok":
            log.debug("bmc audit found a fault", host=target.name, bmc=target.endpoint.address, outcome=outcome,
                     reason=message)
        return result


async def audit_once(targets: Sequence[AuditTarget], factory: BmcFactory, *, concurrency: int = 8,
                     timeout: float = 30.0, close: bool = True) -> list[AuditResult]:
    """Check every target's BMC (``Bmc.check()``), at most ``concurrency`` at a time, each bounded by
    ``timeout`` seconds: a BMC that hangs costs its own slot for ``timeout`` and delays no other check
    beyond that.  Results come in the order of ``targets``.  ``factory`` makes the ``Bmc`` for an
    endpoint; with ``close=False`` the BMCs it hands out are long-lived (shared with the power actions)
    and are not closed here."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    round_ = _Round(factory, timeout, close, asyncio.Semaphore(concurrency))
    return list(await asyncio.gather(*(_check_one(t, round_) for t in targets)))
