"""The Kubernetes operations host maintenance needs, behind one small interface.

``KubeApi`` is what the drain logic (``services.orchestrator.maintenance``) calls: read a node, change its
``spec.unschedulable``, taints and labels (one strategic-merge patch with the ``resourceVersion`` read, so a
concurrent writer makes it fail with ``KubeConflict`` instead of being overwritten), list the pods bound to a
node, and evict one pod through the policy/v1 Eviction subresource (which honours PodDisruptionBudgets).

``KubernetesApi`` implements it with the official ``kubernetes`` client, configured from a kubeconfig file
or the in-cluster service account, as for a real cluster.  That client is synchronous: every call runs on a
small thread pool of its own (never on the event loop, and never starving the loop's default executor),
with a per-request timeout so that an unresponsive API server cannot pin a thread for ever.

Errors come out as ``KubeError`` (``status`` is the HTTP status, or None when no answer came back;
``transient`` says whether trying again later may help); the message is the API server's own Status
message, never a credential.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import structlog

log = structlog.get_logger("roost.orchestrator.kube")

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"     # a static pod's mirror: the kubelet owns it
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
PATCH_TYPE = "application/strategic-merge-patch+json"

T = TypeVar("T")


class KubeError(Exception):
    """A Kubernetes API call failed.  ``status``: the HTTP status (None: no answer); ``transient``: retry may help."""

    def __init__(self, message: str, status: int | None = None, *, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


class KubeConflict(KubeError):
    """409: the object changed since it was read (its ``resourceVersion`` no longer matches)."""


class KubeNotFound(KubeError):
    """404: the object does not exist."""


class KubeConfigError(Exception):
    """The kubeconfig or the in-cluster configuration cannot be used."""


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    effect: str
    value: str | None = None
    time_added: str | None = None      # kept as the server wrote it when a taint list is written back

    def same(self, other: Taint) -> bool:
        """The API server keys taints by (key, effect)."""
        return (self.key, self.effect) == (other.key, other.effect)

    def as_json(self) -> dict[str, str]:
        out = {"key": self.key, "effect": self.effect}
        if self.value is not None:
            out["value"] = self.value
        if self.time_added is not None:
            out["timeAdded"] = self.time_added
        return out

    def __str__(self) -> str:
        return f"{self.key}{'=' + self.value if self.value else ''}:{self.effect}"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    resource_version: str
    unschedulable: bool
    taints: tuple[Taint, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def has_taint(self, taint: Taint) -> bool:
        return any(t.same(taint) for t in self.taints)


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    phase: str = "Running"
    owner_kinds: tuple[str, ...] = ()
    mirror: bool = False
    deletion: datetime | None = None   # metadata.deletionTimestamp: set when deleted, to when it should be gone

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminating(self) -> bool:
        return self.deletion is not None

    def overdue(self, now: datetime, slack: float) -> bool:
        """Terminating and still here ``slack`` seconds after it should have been gone: its kubelet is not acting
        (the host is down), so waiting longer will not make it go (kubectl drain's skip-wait-for-delete-timeout)."""
        return self.deletion is not None and (now - self.deletion).total_seconds() > slack

    @property
    def daemonset(self) -> bool:
        return "DaemonSet" in self.owner_kinds

    @property
    def must_leave(self) -> bool:
        """Whether a drain waits for this pod to be gone: DaemonSet pods (their controller ignores the cordon
        and would put them back), mirror pods (the kubelet owns them; the API cannot evict them) and pods
        that already finished stay."""
        return not (self.daemonset or self.mirror or self.phase in TERMINAL_PHASES)


@dataclass(frozen=True, slots=True)
class Eviction:
    """What an eviction request came to: ``evicted`` (201), ``refused`` (429: a PodDisruptionBudget, or the
    server, says not now), ``gone`` (404: the pod is already deleted)."""

    outcome: Literal["evicted", "refused", "gone"]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One patch of a node; None leaves a field as it is, a label set to None is removed."""

    unschedulable: bool | None = None
    taints: Sequence[Taint] | None = None
    labels: Mapping[str, str | None] | None = None

    def patch(self, resource_version: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"resourceVersion": resource_version}
        spec: dict[str, Any] = {}
        if self.labels is not None:
            metadata["labels"] = dict(self.labels)
        if self.unschedulable is not None:
            spec["unschedulable"] = self.unschedulable
        if self.taints is not None:
            spec["taints"] = [t.as_json() for t in self.taints]   # an atomic list: the patch replaces it whole
        body: dict[str, Any] = {"metadata": metadata}
        if spec:
            body["spec"] = spec
        return body


class KubeApi(Protocol):
    """The Kubernetes operations host maintenance needs."""

    @property
    def description(self) -> str:
        """Where it talks to, for logs and replies (no credentials)."""
        ...

    async def read_node(self, name: str) -> Node | None:
        """The node, or None when the cluster has no node of that name."""
        ...

    async def change_node(self, node: Node, change: NodeChange) -> Node:
        """Apply ``change`` to ``node`` as read; ``KubeConflict`` if it changed since, ``KubeNotFound`` if gone."""
        ...

    async def pods_on_node(self, name: str) -> list[Pod]:
        """Every pod bound to the node, in any namespace and phase."""
        ...

    async def evict(self, pod: Pod, grace_seconds: int | None = None) -> Eviction:
        """Ask the Eviction API to evict ``pod`` (``KubeError`` for anything but 201, 404 and 429)."""
        ...

    async def close(self) -> None: ...


def status_message(body: str | bytes | None, fallback: str) -> str:
    """The message of a Kubernetes ``Status`` body, with its causes (a PodDisruptionBudget names itself there)."""
    if not body:
        return fallback
    try:
        status = json.loads(body)
    except ValueError:
        return fallback
    if not isinstance(status, dict):
        return fallback
    message = str(status.get("message") or fallback)
    causes = (status.get("details") or {}).get("causes") or []
    texts = [str(c.get("message")) for c in causes if isinstance(c, dict) and c.get("message")]
    return f"{message} ({'; '.join(texts)})" if texts else message


def _error(exc: BaseException) -> KubeError:
    """A ``KubeError`` for whatever the client raised."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status) if exc.status else None
        message = status_message(exc.body, str(exc.reason or "error"))
        if status == 409:
            return KubeConflict(message, status)
        if status == 404:
            return KubeNotFound(message, status)
        transient = status is None or status in (408, 429) or status >= 500
        return KubeError(f"HTTP {status}: {message}", status, transient=transient)
    # urllib3 and socket errors: no answer from the API server (down, unreachable, timed out)
    return KubeError(f"the Kubernetes API server did not answer: {type(exc).__name__}: {exc}", transient=True)


def _node(obj: Any) -> Node:
    meta, spec = obj.metadata, obj.spec
    taints = tuple(Taint(key=t.key, effect=t.effect, value=t.value,
                         time_added=t.time_added.isoformat().replace("+00:00", "Z") if t.time_added else None)
                   for t in ((spec.taints if spec is not None else None) or []))
    return Node(name=meta.name, resource_version=meta.resource_version or "",
                unschedulable=bool(spec.unschedulable) if spec is not None else False,
                taints=taints, labels=dict(meta.labels or {}))


def _pod(obj: Any) -> Pod:
    meta = obj.metadata
    owners = tuple(o.kind for o in (meta.owner_references or []))
    return Pod(namespace=meta.namespace or "default", name=meta.name,
               phase=(obj.status.phase if obj.status is not None else None) or "Unknown",
               owner_kinds=owners, mirror=MIRROR_ANNOTATION in (meta.annotations or {}),
               deletion=meta.deletion_timestamp)


class KubernetesApi:
    """``KubeApi`` with the official ``kubernetes`` client; each call on a thread of its own pool."""

    def __init__(self, api_client: Any, *, description: str, request_timeout: float = 10.0,
                 workers: int = 4) -> None:
        from kubernetes import client

        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._description = description
        self.request_timeout = request_timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roost-kube")

    @property
    def description(self) -> str:
        return self._description

    @classmethod
    async def from_kubeconfig(cls, path: Path, *, context: str | None = None,
                              request_timeout: float = 10.0) -> KubernetesApi:
        """From a kubeconfig file (its current context, or ``context``)."""
        from kubernetes import config

        def load() -> Any:
            if not path.is_file():
                raise KubeConfigError(f"kubeconfig {path} does not exist")
            try:
                return config.new_client_from_config(  # type: ignore[no-untyped-call]
                    config_file=str(path), context=context, persist_config=False)
            except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
                raise KubeConfigError(f"kubeconfig {path}: {exc}") from None

        api_client = await asyncio.to_thread(load)
        where = f"kubeconfig {path}" + (f" (context {context})" if context else "")
        return cls(api_client, description=where, request_timeout=request_timeout)

    @classmethod
    async def in_cluster(cls, *, request_timeout: float = 10.0) -> KubernetesApi:
        """From the pod's service account (``KUBERNETES_SERVICE_HOST`` and the mounted token)."""
        from kubernetes import client, config

        def load() -> Any:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except config.ConfigException as exc:
                raise KubeConfigError(f"in-cluster configuration: {exc}") from None
            return client.ApiClient(configuration)

        return cls(await asyncio.to_thread(load), description="in-cluster service account",
                   request_timeout=request_timeout)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = partial(fn, *args, _request_timeout=self.request_timeout, **kwargs)
        try:
            return await loop.run_in_executor(self._executor, call)
        except (KubeError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _error(exc) from exc

    async def read_node(self, name: str) -> Node | None:
        try:
            return _node(await self._call(self._core.read_node, name))
        except KubeNotFound:
            return None

    async def change_node(self, node: Node, change: NodeChange) -> Node:
        body = change.patch(node.resource_version)
        return _node(await self._call(self._core.patch_node, node.name, body, _content_type=PATCH_TYPE))

    async def pods_on_node(self, name: str) -> list[Pod]:
        pods: list[Pod] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"field_selector": f"spec.nodeName={name}", "limit": 500}
            if token:
                kwargs["_continue"] = token
            page = await self._call(self._core.list_pod_for_all_namespaces, **kwargs)
            pods += [_pod(p) for p in page.items or []]
            meta = page.metadata
            # the field is ``var_continue`` in the pydantic-generated client, ``_continue`` in older ones
            token = (getattr(meta, "var_continue", None) or getattr(meta, "_continue", None)) if meta else None
            if not token:
                return pods

    async def evict(self, pod: Pod, grace_seconds: int | None = None) -> Eviction:
        from kubernetes import client

        body = client.V1Eviction(
            api_version="policy/v1", kind="Eviction",
            metadata=client.V1ObjectMeta(name=pod.name, namespace=pod.namespace),
            delete_options=client.V1DeleteOptions(grace_period_seconds=grace_seconds)
            if grace_seconds is not None else None)
        try:
            await self._call(self._core.create_namespaced_pod_eviction, pod.name, pod.namespace, body)
        except KubeNotFound:
            return Eviction("gone")
        except KubeError as exc:
            if exc.status == 429:
                return Eviction("refused", str(exc).removeprefix("HTTP 429: "))
            raise
        return Eviction("evicted")

    async def close(self) -> None:
        def close() -> None:
            self._api_client.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
