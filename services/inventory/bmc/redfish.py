"""A BMC driven over Redfish with the DMTF ``redfish`` library (``services.inventory.bmc.abc.Bmc``).

How it talks:

* One ``redfish`` client per BMC, made on first use, logged in with **basic** auth (sushy-tools and
  many small BMCs have no SessionService; basic auth is checked on every request, so a password changed
  on the BMC is noticed at the next call).  ``timeout`` per HTTP request is the endpoint's, and the
  library retries a failed connection once (``max_retry=1``).  TLS is verified against the CA bundle of
  ``requests`` (or ``REQUESTS_CA_BUNDLE``) unless the endpoint says ``verify_tls=False``.
* The library is synchronous: every request runs on a thread of this module's own pool (``_EXECUTOR``;
  like ``asyncio.to_thread``, with the caller's context, but a BMC that hangs can never starve the
  event loop's default executor, which asyncio also uses to resolve host names).  The calls of one BMC
  are serialised by an ``asyncio.Lock`` and each has a deadline (``call_timeout``); when a call outlives
  it, the caller gets ``BmcUnreachable`` and the next call waits for the abandoned thread (whose own
  socket timeouts bound it) before using the client again.
* Errors: a connection that fails or times out, a TLS failure, a 5xx → ``BmcUnreachable``; 401/403 →
  ``BmcAuthFailed``; 501, a reset type the system does not advertise, no reset action, no boot override
  → ``BmcUnsupported``; 409/429 → ``BmcBusy``; anything else (no such system, several systems and no
  ``system_id``, a 4xx) → ``BmcError``.  Messages name the BMC by its address and never carry the
  password; the library's exceptions are not chained (a ``requests`` exception holds the request and so
  the ``Authorization`` header).

Power actions follow the table in ``abc.py`` with the reset types the system advertises
(``ResetType@Redfish.AllowableValues``, or its ``@Redfish.ActionInfo``; a system that advertises
neither is sent the standard types and its answer decides).  ``power-on`` / ``power-off`` on a system
already in that state send nothing.  ``power-off`` is always graceful first: ``GracefulShutdown``,
then ``ForceOff`` once ``graceful_timeout`` passes with the power still on (that grace is part of the
action even without ``wait``); ``wait`` then bounds the wait for the final state after the last reset
type was sent.

**A power action during a power action** (a reset during a reset): refused with ``BmcBusy`` naming the
action in progress.  An action is in progress from the moment ``perform`` starts until the power state
it leads to is observed (by its own ``wait``, or by any later ``power_state()`` / ``check()`` /
``perform`` on this ``RedfishBmc``), at most ``settle_timeout`` seconds after ``perform`` returned.  It is
not coalesced: a second reset could cut short the boot the first one started, and the caller (the host
state machine) should see that its command did not run.  Keep one ``RedfishBmc`` per BMC for this to
hold.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import certifi
import redfish
import requests
import structlog
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from redfish.rest.v1 import (
    InvalidCredentialsError,
    JsonDecodingError,
    RetriesExhaustedError,
    ServerDownOrUnreachableError,
)

from schemas.inventory import MAC_PATTERN, Cpu, Disk, Hardware, Memory, Port, PowerState
from services.core.logging import register_secret
from services.inventory.bmc.abc import (
    ActionReport,
    BmcActionName,
    BmcAuthFailed,
    BmcBusy,
    BmcEndpoint,
    BmcError,
    BmcSystem,
    BmcUnreachable,
    BmcUnsupported,
)

log = structlog.get_logger("roost.inventory.bmc")

T = TypeVar("T")

ACTIONS: Final[tuple[BmcActionName, ...]] = ("power-on", "power-off", "reset", "reboot", "reinstall")
STANDARD_RESET_TYPES: Final = ("On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "ForceOn")
_PAIRS: Final[dict[str, tuple[str, str]]] = {          # action: (first choice, when the first is not offered)
    "power-on": ("On", "ForceOn"),
    "reset": ("ForceRestart", "GracefulRestart"),
    "reboot": ("GracefulRestart", "ForceRestart"),
}
_LEADS_TO: Final[dict[str, PowerState]] = {"power-on": "on", "power-off": "off", "reset": "on", "reboot": "on",
                                           "reinstall": "on"}
_POWER_STATES: Final[dict[str, PowerState]] = {"on": "on", "off": "off", "poweringon": "powering-on",
                                               "poweringoff": "powering-off", "paused": "on"}
_MEMBERS_MAX: Final = 256                 # members read from one collection (ports, drives, processors)
_SYSTEMS_PATH: Final = "/redfish/v1/Systems"
_ERRNO_TEXT: Final = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_MAC: Final = re.compile(MAC_PATTERN)

_EXECUTOR: Final = ThreadPoolExecutor(max_workers=32, thread_name_prefix="roost-bmc")

REQUEST_SECONDS: Final = Histogram(
    "roost_bmc_request_seconds", "Time of one BMC call (one or a few Redfish requests), by operation",
    ["operation"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
FAILURES: Final = Counter(
    "roost_bmc_failures", "BMC calls that failed, by operation and kind of failure",
    ["operation", "kind"])

# verify_tls=False is the operator's explicit choice (logged once per BMC); not a warning per request.
warnings.filterwarnings("ignore", message="Unverified HTTPS request", module="urllib3")
# The library logs every request ("Attempt 1 of /redfish/v1/…", response times) at INFO: keep that out of
# the services' logs unless someone asked for the library's logger explicitly.
if logging.getLogger("redfish").level == logging.NOTSET:
    logging.getLogger("redfish").setLevel(logging.WARNING)


def _power_state(value: object) -> PowerState:
    return _POWER_STATES.get(str(value).lower(), "unknown") if value else "unknown"


def _odata_id(value: object) -> str | None:
    if isinstance(value, Mapping):
        target = value.get("@odata.id")
        if isinstance(target, str) and target.startswith("/"):
            return target
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value >= 0 else None


def _text(value: object, limit: int = 255) -> str:
    return " ".join(str(value).split())[:limit] if isinstance(value, str | int | float) else ""


def _mac(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    mac = value.strip().lower().replace("-", ":")
    return mac if _MAC.match(mac) else None


def _error_message(body: object) -> str:
    """The human part of a Redfish error body, short."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            info = error.get("@Message.ExtendedInfo")
            if isinstance(info, list) and info and isinstance(info[0], Mapping) and info[0].get("Message"):
                return _text(info[0]["Message"], 200)
            if error.get("message"):
                return _text(error["message"], 200)
    return ""


def _describe_transport(exc: BaseException | None, timeout: float) -> str:
    """What went wrong on the wire, without the request (whose headers carry the credentials)."""
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, requests.exceptions.SSLError):
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return "its TLS certificate is not trusted (verify_tls is on)"
        return "the TLS handshake failed"
    if isinstance(exc, requests.exceptions.ConnectionError):
        found = _ERRNO_TEXT.search(str(exc))
        return found.group(1).strip().lower() if found else "the connection failed"
    return f"the request failed ({type(exc).__name__})" if exc is not None else "the request failed"


@dataclass(slots=True)
class _InProgress:
    """A power action on this BMC whose outcome has not been observed yet."""

    action: BmcActionName
    leads_to: PowerState
    started: float
    sent: tuple[str, ...] = ()
    running: bool = True                  # perform() is still at it
    settled_by: float | None = None       # when not running: it no longer counts after this (monotonic)

    def describe(self) -> str:
        age = time.monotonic() - self.started
        what = f"started {age:.1f}s ago" + (f", sent {', '.join(self.sent)}" if self.sent else "")
        return f"a {self.action} is in progress ({what}; waiting for power {self.leads_to})"


@dataclass(frozen=True, slots=True)
class _SystemView:
    """The parts of the ComputerSystem a power action needs."""

    power_state: PowerState
    reset_target: str | None
    reset_types: tuple[str, ...] | None   # None: the system does not say
    boot: Mapping[str, Any] | None
    document: Mapping[str, Any]


class RedfishBmc:
    """One BMC (one system on it) over Redfish.  See the module's docstring for the behaviour."""

    def __init__(self, endpoint: BmcEndpoint, *, graceful_timeout: float = 60.0, poll_interval: float = 1.0,
                 settle_timeout: float = 120.0, call_timeout: float | None = None) -> None:
        parts = urlsplit(endpoint.address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BmcError(f"BMC address {endpoint.address!r} is not an http(s)://host[:port] URL")
        if parts.username is not None or parts.password is not None:
            raise BmcError(f"BMC address of {parts.hostname}: credentials do not belong in the address; "
                           "give the username and password as settings")
        self.endpoint = endpoint
        self.address = endpoint.address.rstrip("/")
        self.graceful_timeout = graceful_timeout
        self.poll_interval = poll_interval
        self.settle_timeout = settle_timeout
        # a call is a few requests, each at most two attempts of ``timeout`` plus the library's 1 s pause
        self.call_timeout = call_timeout if call_timeout is not None else 4 * endpoint.timeout + 2
        self._lock = asyncio.Lock()
        self._client: Any = None              # redfish.rest.v1.HttpClient, made and used on _EXECUTOR only
        self._abandoned: asyncio.Future[Any] | None = None
        self._system_path: str | None = None
        self._action: _InProgress | None = None
        register_secret(endpoint.password)
        if parts.scheme == "https" and not endpoint.verify_tls:
            log.warning("bmc tls not verified", bmc=self.address)

    def __repr__(self) -> str:
        return (f"RedfishBmc(address={self.address!r}, username={self.endpoint.username!r}, "
                f"system_id={self.endpoint.system_id!r})")

    # -- the Bmc protocol --------------------------------------------------------------------------------

    async def check(self) -> BmcSystem:
        """Reach the BMC, log in, find the system; what it says about it (with its NICs' MACs)."""
        view = await self._read_system("check")
        macs: list[str] = []
        try:
            for nic in await self._ethernet_interfaces(view.document):
                mac = _mac(nic.get("MACAddress")) or _mac(nic.get("PermanentMACAddress"))
                if mac is not None and mac not in macs:
                    macs.append(mac)
        except (BmcUnreachable, BmcUnsupported):
            pass                      # the system answered; its NICs are an extra
        doc = view.document
        return BmcSystem(system_id=str(doc.get("Id") or self._system_path or ""), power_state=view.power_state,
                         manufacturer=_text(doc.get("Manufacturer")), model=_text(doc.get("Model")),
                         serial=_text(doc.get("SerialNumber")), macs=tuple(macs),
                         reset_types=view.reset_types or ())

    async def power_state(self) -> PowerState:
        return (await self._read_system("power")).power_state

    async def perform(self, action: BmcActionName, *, wait: float | None = None) -> ActionReport:
        if action not in ACTIONS:
            raise BmcError(f"BMC {self.address}: unknown power action {action!r} (one of {', '.join(ACTIONS)})")
        await self._claim(action)
        progress = self._action
        assert progress is not None
        sent: list[str] = []
        state: PowerState = "unknown"
        try:
            state = await self._carry_out(action, progress, sent)
            if sent and state != progress.leads_to:
                if wait is not None and wait > 0:
                    state = await self._poll_until(progress.leads_to, wait)
                else:
                    state = await self._read_power_quietly(state)
            return ActionReport(action=action, sent=tuple(sent), power_state=state)
        finally:
            if not sent or state == progress.leads_to:
                if self._action is progress:
                    self._action = None
            else:
                progress.running = False
                progress.settled_by = time.monotonic() + self.settle_timeout

    async def hardware(self) -> Hardware:
        """Processors, memory, storage and NICs, as far as the BMC offers them; whatever it does not
        offer (a missing link, 404, 501, a 5xx on one resource) is left out, not an error."""
        view = await self._read_system("inventory")
        doc = view.document
        cpus = await self._cpus(doc)
        memory = None
        summary = doc.get("MemorySummary")
        if isinstance(summary, Mapping):
            gib = summary.get("TotalSystemMemoryGiB")
            if isinstance(gib, int | float) and not isinstance(gib, bool) and gib > 0:
                memory = Memory(total_mib=round(gib * 1024))
        disks = await self._disks(doc)
        ports: list[Port] = []
        for nic in await self._ethernet_interfaces(doc):
            port = _port(nic, len(ports))
            if port is not None:
                ports.append(port)
        return Hardware(cpus=cpus, memory=memory, disks=disks, ports=ports, source="redfish",
                        reported_at=datetime.now(UTC))

    async def close(self) -> None:
        async with self._lock:
            await self._wait_abandoned()
            client, self._client = self._client, None
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(_EXECUTOR, _close_client, client)

    # -- extras (not in the protocol) -----------------------------------------------------------------------

    async def send_reset(self, reset_type: str) -> None:
        """Send one reset type as it is (e.g. ``PowerCycle``, ``Nmi``) if the system advertises it:
        ``BmcUnsupported`` when it does not, or answers 501; ``BmcBusy`` while a power action is in
        progress.  Not itself tracked as a power action."""
        progress = self._current_action()
        if progress is not None:
            raise BmcBusy(f"BMC {self.address}: {progress.describe()}; {reset_type} refused")
        view = await self._read_system("reset")
        self._require(view, reset_type)
        await self._post_reset(view, reset_type)

    @property
    def action_in_progress(self) -> BmcActionName | None:
        progress = self._current_action()
        return progress.action if progress is not None else None

    # -- power actions ------------------------------------------------------------------------------------

    def _current_action(self) -> _InProgress | None:
        progress = self._action
        if progress is not None and not progress.running and progress.settled_by is not None \
                and time.monotonic() > progress.settled_by:
            log.warning("bmc power action never observed to land", bmc=self.address, action=progress.action,
                        sent=list(progress.sent), expected=progress.leads_to)
            self._action = progress = None
        return progress

    async def _claim(self, action: BmcActionName) -> None:
        """Make ``action`` the action in progress, or raise ``BmcBusy`` naming the one that is."""
        previous = self._current_action()
        if previous is not None and previous.running:
            raise BmcBusy(f"BMC {self.address}: {previous.describe()}; {action} refused, try again when it is done")
        mine = _InProgress(action, _LEADS_TO[action], time.monotonic())
        if previous is None:
            self._action = mine
            return
        # an earlier action was sent and not seen to land: look once (hold the claim meanwhile)
        previous.running = True
        try:
            state = (await self._read_system("power")).power_state
        finally:
            previous.running = False
        if state == previous.leads_to:
            self._action = mine
            return
        raise BmcBusy(f"BMC {self.address}: {previous.describe()}; {action} refused, try again when it is done")

    def _observe(self, state: PowerState) -> None:
        progress = self._action
        if progress is not None and not progress.running and progress.sent and state == progress.leads_to:
            log.info("bmc power action landed", bmc=self.address, action=progress.action, power_state=state,
                     seconds=round(time.monotonic() - progress.started, 1))
            self._action = None

    async def _carry_out(self, action: BmcActionName, progress: _InProgress, sent: list[str]) -> PowerState:
        view = await self._read_system("power")
        state = view.power_state

        async def send(reset_type: str) -> None:
            try:
                await self._post_reset(view, reset_type)
            except BmcUnreachable:
                # no answer is not "not done": the BMC may have carried it out, so the action stays in
                # progress (refusing another) until its outcome is seen or settle_timeout passes
                sent.append(reset_type)
                progress.sent = tuple(sent)
                raise
            sent.append(reset_type)
            progress.sent = tuple(sent)
            log.info("bmc reset sent", bmc=self.address, action=action, reset_type=reset_type)

        if action == "power-on":
            if state == "on":
                return state
            await send(self._choose(view, *_PAIRS[action]))
        elif action == "power-off":
            if state == "off":
                return state
            graceful = self._offers(view, "GracefulShutdown")
            force = self._offers(view, "ForceOff")
            if not graceful and not force:
                raise BmcUnsupported(f"BMC {self.address}: the system offers neither GracefulShutdown nor ForceOff")
            if graceful:
                await send("GracefulShutdown")
                state = await self._poll_until("off", self.graceful_timeout)
                if state == "off":
                    return state
                if not force:
                    log.warning("bmc graceful shutdown did not finish and ForceOff is not offered",
                                bmc=self.address, waited=self.graceful_timeout)
                    return state
                log.info("bmc graceful shutdown timed out; forcing", bmc=self.address, waited=self.graceful_timeout)
            await send("ForceOff")
        elif action in ("reset", "reboot"):
            await send(self._choose(view, *_PAIRS[action]))
        else:                                    # reinstall: network boot once, then (re)start
            reset_type = (self._choose(view, "On", "ForceOn") if state == "off"
                          else self._choose(view, "ForceRestart", "GracefulRestart"))
            await self._set_pxe_once(view)
            await send(reset_type)
        return "unknown"

    def _offers(self, view: _SystemView, reset_type: str) -> bool:
        return view.reset_types is None or reset_type in view.reset_types

    def _choose(self, view: _SystemView, first: str, instead: str) -> str:
        if self._offers(view, first):
            return first
        if self._offers(view, instead):
            log.warning("bmc reset type not offered; using the other of the pair", bmc=self.address,
                        wanted=first, using=instead)
            return instead
        raise BmcUnsupported(f"BMC {self.address}: the system offers neither {first} nor {instead} "
                             f"(it offers {', '.join(view.reset_types or ()) or 'none'})")

    def _require(self, view: _SystemView, reset_type: str) -> None:
        if view.reset_target is None:
            raise BmcUnsupported(f"BMC {self.address}: the system has no ComputerSystem.Reset action")
        if not self._offers(view, reset_type):
            raise BmcUnsupported(f"BMC {self.address}: the system does not offer reset type {reset_type} "
                                 f"(it offers {', '.join(view.reset_types or ()) or 'none'})")

    async def _post_reset(self, view: _SystemView, reset_type: str) -> None:
        self._require(view, reset_type)
        target = view.reset_target
        assert target is not None

        def post(client: Any) -> None:
            # never retried: a reset whose answer was lost may have been carried out
            response = client.post(target, body={"ResetType": reset_type}, max_retry=0)
            self._raise_for(response, f"reset {reset_type}")

        await self._run("reset", post)

    async def _set_pxe_once(self, view: _SystemView) -> None:
        boot = view.boot
        if boot is None:
            raise BmcUnsupported(f"BMC {self.address}: the system has no Boot settings (no boot override)")
        allowed = boot.get("BootSourceOverrideTarget@Redfish.AllowableValues")
        if isinstance(allowed, list) and "Pxe" not in allowed:
            raise BmcUnsupported(f"BMC {self.address}: the system cannot boot from the network once "
                                 f"(boot override targets: {', '.join(map(str, allowed))})")
        enabled = boot.get("BootSourceOverrideEnabled@Redfish.AllowableValues")
        if isinstance(enabled, list) and "Once" not in enabled:
            raise BmcUnsupported(f"BMC {self.address}: the system has no one-time boot override "
                                 f"(BootSourceOverrideEnabled: {', '.join(map(str, enabled))})")
        path = self._system_path
        assert path is not None
        body = {"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}

        def patch(client: Any) -> None:
            response = client.patch(path, body=body, max_retry=0)
            self._raise_for(response, "boot override")

        await self._run("boot", patch)
        log.info("bmc boot override set", bmc=self.address, target="Pxe", enabled="Once")

    async def _poll_until(self, wanted: PowerState, seconds: float) -> PowerState:
        """Read the power state until it is ``wanted`` or ``seconds`` pass; the last state read
        (``unknown`` when the last read failed: a BMC may stop answering while its host resets)."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            try:
                state = (await self._read_system("power")).power_state
            except BmcUnreachable:
                state = "unknown"
            if state == wanted or time.monotonic() >= deadline:
                return state
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    async def _read_power_quietly(self, fallback: PowerState) -> PowerState:
        try:
            return (await self._read_system("power")).power_state
        except BmcError:                 # the action was sent; a failed read afterwards does not undo it
            return fallback

    # -- reading --------------------------------------------------------------------------------------

    async def _read_system(self, operation: str) -> _SystemView:
        def read(client: Any) -> _SystemView:
            path = self._system_path or self._discover(client)
            document = self._get(client, path, "the system")
            assert document is not None
            canonical = _odata_id(document)
            if canonical is not None:
                path = canonical
            self._system_path = path
            return self._view(client, path, document)

        view = await self._run(operation, read)
        self._observe(view.power_state)
        return view

    def _discover(self, client: Any) -> str:
        """The path of the system to drive (runs on the executor)."""
        root = client.root if isinstance(getattr(client, "root", None), Mapping) else {}
        collection = _odata_id(root.get("Systems")) or _SYSTEMS_PATH
        wanted = self.endpoint.system_id
        if wanted:
            path = f"{collection.rstrip('/')}/{quote(wanted, safe='')}"
            found = self._get(client, path, f"system {wanted!r}", optional=True)
            if found is not None:
                return _odata_id(found) or path
        members = self._members(client, collection, "the systems collection")
        if not wanted:
            if len(members) == 1:
                return members[0]
            if not members:
                raise BmcError(f"BMC {self.address}: it has no systems")
            names = ", ".join(m.rsplit("/", 1)[-1] for m in members[:10])
            raise BmcError(f"BMC {self.address}: it has {len(members)} systems ({names}); set the BMC's "
                           "system id to the one to drive")
        for member in members:
            doc = self._get(client, member, "a system", optional=True) or {}
            keys = {str(doc.get(k, "")).lower() for k in ("Id", "UUID", "Name")}
            if wanted.lower() in keys:
                return _odata_id(doc) or member
        names = ", ".join(m.rsplit("/", 1)[-1] for m in members[:10]) or "none"
        raise BmcError(f"BMC {self.address}: it has no system {wanted!r} (it has {names})")

    def _view(self, client: Any, path: str, document: Mapping[str, Any]) -> _SystemView:
        actions = document.get("Actions")
        reset = actions.get("#ComputerSystem.Reset") if isinstance(actions, Mapping) else None
        target: str | None = None
        types: tuple[str, ...] | None = None
        if isinstance(reset, Mapping):
            target = reset.get("target") if isinstance(reset.get("target"), str) else \
                f"{path.rstrip('/')}/Actions/ComputerSystem.Reset"
            allowed = reset.get("ResetType@Redfish.AllowableValues")
            if isinstance(allowed, list):
                types = tuple(str(t) for t in allowed)
            elif isinstance(reset.get("@Redfish.ActionInfo"), str):
                info = self._get(client, reset["@Redfish.ActionInfo"], "the reset action's info", optional=True)
                for parameter in (info or {}).get("Parameters", []) or []:
                    if isinstance(parameter, Mapping) and parameter.get("Name") == "ResetType" \
                            and isinstance(parameter.get("AllowableValues"), list):
                        types = tuple(str(t) for t in parameter["AllowableValues"])
        boot = document.get("Boot")
        return _SystemView(power_state=_power_state(document.get("PowerState")), reset_target=target,
                           reset_types=types, boot=boot if isinstance(boot, Mapping) else None, document=document)

    async def _ethernet_interfaces(self, system: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return await self._linked_members(system.get("EthernetInterfaces"), "inventory")

    async def _linked_members(self, link: object, operation: str) -> list[Mapping[str, Any]]:
        """The documents of a linked collection's members, each read separately (the lock is let go in
        between, so a power action is not held up by a long inventory walk); missing parts left out."""
        collection = _odata_id(link)
        if collection is None:
            return []
        paths = await self._run(operation, lambda c: self._members(c, collection, "a collection", optional=True))
        documents: list[Mapping[str, Any]] = []
        for path in paths:
            doc = await self._run(operation, functools.partial(self._get_optional, path=path, what="a resource"))
            if doc is not None:
                documents.append(doc)
        return documents

    async def _cpus(self, system: Mapping[str, Any]) -> list[Cpu]:
        cpus: list[Cpu] = []
        socket = 0
        for processor in await self._linked_members(system.get("Processors"), "inventory"):
            kind = processor.get("ProcessorType")
            if kind not in (None, "CPU"):
                continue
            cores = _int(processor.get("TotalCores")) or 0
            threads = _int(processor.get("TotalThreads")) or cores
            if cores <= 0:
                socket += 1
                continue
            per_core = max(1, threads // cores)
            model = _text(processor.get("Model"))
            for core in range(cores):
                for thread in range(per_core):
                    cpus.append(Cpu(cpu=len(cpus), socket=socket, core=core, thread=thread, model=model))
            socket += 1
        if cpus:
            return cpus
        summary = system.get("ProcessorSummary")            # no Processors: the summary, if it is complete
        if isinstance(summary, Mapping):
            sockets = _int(summary.get("Count")) or 0
            cores = _int(summary.get("CoreCount")) or 0
            logical = _int(summary.get("LogicalProcessorCount")) or 0
            if sockets and cores and logical and cores % sockets == 0 and logical % cores == 0:
                per_socket, per_core = cores // sockets, logical // cores
                model = _text(summary.get("Model"))
                for s in range(sockets):
                    for core in range(per_socket):
                        for thread in range(per_core):
                            cpus.append(Cpu(cpu=len(cpus), socket=s, core=core, thread=thread, model=model))
        return cpus

    async def _disks(self, system: Mapping[str, Any]) -> list[Disk]:
        disks: list[Disk] = []
        for storage in await self._linked_members(system.get("Storage"), "inventory"):
            for link in (storage.get("Drives") or [])[:_MEMBERS_MAX]:
                path = _odata_id(link)
                if path is None:
                    continue
                drive = await self._run("inventory", functools.partial(self._get_optional, path=path, what="a drive"))
                if drive is not None:
                    disk = _disk(drive, _text(drive.get("Id")) or path.rsplit("/", 1)[-1])
                    if disk is not None:
                        disks.append(disk)
        if disks:
            return disks
        for controller in await self._linked_members(system.get("SimpleStorage"), "inventory"):
            for device in (controller.get("Devices") or [])[:_MEMBERS_MAX]:
                if isinstance(device, Mapping):
                    disk = _disk(device, _text(device.get("Name")) or f"device-{len(disks)}")
                    if disk is not None:
                        disks.append(disk)
        return disks

    # -- the wire ---------------------------------------------------------------------------------------

    def _get(self, client: Any, path: str, what: str, *, optional: bool = False) -> Mapping[str, Any] | None:
        """GET ``path`` (on the executor): its JSON object; None when ``optional`` and it is not there."""
        response = client.get(path)
        if response.status == 200:
            try:
                body = response.dict
            except (JsonDecodingError, ValueError):
                body = None
            if isinstance(body, Mapping):
                return body
            if optional:
                return None
            raise BmcError(f"BMC {self.address}: {what} ({path}) is not a JSON object")
        if optional and response.status not in (401, 403):
            log.debug("bmc resource not offered", bmc=self.address, path=path, status=response.status)
            return None
        self._raise_for(response, what)
        return None

    def _get_optional(self, client: Any, *, path: str, what: str) -> Mapping[str, Any] | None:
        return self._get(client, path, what, optional=True)

    def _members(self, client: Any, path: str, what: str, *, optional: bool = False) -> list[str]:
        paths: list[str] = []
        next_page: str | None = path
        while next_page and len(paths) < _MEMBERS_MAX:
            body = self._get(client, next_page, what, optional=optional)
            if body is None:
                break
            for member in body.get("Members") or []:
                member_path = _odata_id(member)
                if member_path is not None:
                    paths.append(member_path)
            link = body.get("Members@odata.nextLink")
            next_page = link if isinstance(link, str) and link.startswith("/") and link != next_page else None
        return paths[:_MEMBERS_MAX]

    def _raise_for(self, response: Any, what: str) -> None:
        status = int(response.status)
        if 200 <= status < 300:
            return
        try:
            detail = _error_message(response.dict)
        except Exception:
            detail = ""
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            self._client = None          # log in afresh next time: the credentials may be fixed by then
            raise BmcAuthFailed(f"BMC {self.address} refuses the credentials of user "
                                f"{self.endpoint.username!r} ({what}: {said})")
        if status == 501:
            raise BmcUnsupported(f"BMC {self.address}: {what} is not supported ({said})")
        if status in (409, 429):
            raise BmcBusy(f"BMC {self.address}: {what} refused for now ({said})")
        if status >= 500:
            raise BmcUnreachable(f"BMC {self.address}: {what} failed ({said})")
        raise BmcError(f"BMC {self.address}: {what} failed ({said})")

    def _connect(self) -> Any:
        """The logged-in client, made on first use (on the executor)."""
        if self._client is None:
            endpoint = self.endpoint
            cafile = None
            if self.address.startswith("https://") and endpoint.verify_tls:
                cafile = os.environ.get("REQUESTS_CA_BUNDLE") or certifi.where()
            client = redfish.redfish_client(base_url=self.address, username=endpoint.username,
                                            password=endpoint.password.get_secret_value(), cafile=cafile,
                                            timeout=endpoint.timeout, max_retry=1)
            try:
                client.login(auth="basic")
            except BaseException:
                _close_client(client)
                raise
            self._client = client
        return self._client

    def _in_thread(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` and turn what the library raises into a ``BmcError`` (on the executor).  The
        error is raised outside the ``except`` block so that it carries no library exception."""
        error: BmcError
        try:
            return fn(self._connect())
        except BmcError:
            raise
        except InvalidCredentialsError:
            self._client = None
            error = BmcAuthFailed(f"BMC {self.address} refuses the credentials of user {self.endpoint.username!r} "
                                  "(HTTP 401)")
        except RetriesExhaustedError as exc:
            error = BmcUnreachable(f"BMC {self.address} does not answer: "
                                   f"{_describe_transport(exc.__cause__, self.endpoint.timeout)}")
        except ServerDownOrUnreachableError as exc:
            status = getattr(getattr(exc, "response", None), "status", None)
            error = BmcUnreachable(f"BMC {self.address}: its Redfish service root answers "
                                   f"{f'HTTP {status}' if status else 'with an error'}")
        except requests.exceptions.RequestException as exc:
            error = BmcUnreachable(f"BMC {self.address} does not answer: "
                                   f"{_describe_transport(exc, self.endpoint.timeout)}")
        except JsonDecodingError:
            error = BmcError(f"BMC {self.address} answers with something that is not Redfish JSON")
        except ValidationError:
            error = BmcError(f"BMC {self.address}: what it reports does not fit the hardware model")
        except Exception as exc:
            error = BmcError(f"BMC {self.address}: unexpected {type(exc).__name__} from the Redfish client")
        raise error

    async def _wait_abandoned(self) -> None:
        abandoned = self._abandoned
        if abandoned is not None:
            if not abandoned.done():
                await asyncio.wait({abandoned})
            if not abandoned.cancelled():
                abandoned.exception()          # retrieved: no "exception was never retrieved" noise
            self._abandoned = None

    async def _run(self, operation: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the executor, one at a time per BMC, within ``call_timeout``."""
        async with self._lock:
            await self._wait_abandoned()
            started = time.monotonic()
            context = contextvars.copy_context()
            future: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(
                _EXECUTOR, context.run, self._in_thread, fn)
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.call_timeout)
            except TimeoutError:
                FAILURES.labels(operation, "timeout").inc()
                raise BmcUnreachable(f"BMC {self.address} does not answer within {self.call_timeout:g}s") from None
            except BmcError as exc:
                FAILURES.labels(operation, _kind(exc)).inc()
                raise
            finally:
                REQUEST_SECONDS.labels(operation).observe(time.monotonic() - started)
                if not future.done():
                    self._abandoned = future


def _kind(exc: BmcError) -> str:
    for cls, name in ((BmcAuthFailed, "auth"), (BmcUnreachable, "unreachable"), (BmcUnsupported, "unsupported"),
                      (BmcBusy, "busy")):
        if isinstance(exc, cls):
            return name
    return "error"


def _close_client(client: Any) -> None:
    try:
        client.logout()
    except Exception as exc:                # closing is best effort
        log.debug("bmc logout failed", error=type(exc).__name__)


def _port(nic: Mapping[str, Any], index: int) -> Port | None:
    name = _text(nic.get("Id"), 64) or _text(nic.get("Name"), 64) or f"nic{index}"
    link_status = str(nic.get("LinkStatus") or "")
    link = "up" if link_status == "LinkUp" else "down" if link_status in ("LinkDown", "NoLink") else "unknown"
    try:
        return Port(name=name, mac=_mac(nic.get("MACAddress")) or _mac(nic.get("PermanentMACAddress")),
                    speed_mbps=_int(nic.get("SpeedMbps")), link=link, mtu=_int(nic.get("MTUSize")))
    except ValidationError:
        return None


def _disk(drive: Mapping[str, Any], name: str) -> Disk | None:
    media = str(drive.get("MediaType") or "")
    protocol = str(drive.get("Protocol") or "")
    kind = "NVME" if protocol == "NVMe" else "SSD" if media == "SSD" else "HDD" if media == "HDD" else "unknown"
    size = _int(drive.get("CapacityBytes"))
    try:
        return Disk(device_node=name[:255] or "disk", size_mib=(size or 0) // (1024 * 1024), type=kind,
                    model=_text(drive.get("Model")), serial=_text(drive.get("SerialNumber")))
    except ValidationError:
        return None

