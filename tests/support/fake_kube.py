"""A fake Kubernetes API server for tests: a real HTTP/1.1 server on a loopback socket (stdlib
``ThreadingHTTPServer`` on its own thread) speaking the Kubernetes JSON the official client sends and reads.

No Kubernetes API server can run on this machine, so this plays one, for what host maintenance uses:

* Nodes (core/v1): ``GET /api/v1/nodes/{name}``, ``GET /api/v1/nodes``, ``PATCH /api/v1/nodes/{name}`` with
  ``application/strategic-merge-patch+json`` or ``application/merge-patch+json`` (maps merge, ``null``
  deletes, lists are replaced whole, as they are for ``spec.taints``, an atomic list); a
  ``metadata.resourceVersion`` in the patch that is not the current one is a 409 Conflict; a JSON Patch
  body that is not a list is a 400, as on a real server.
* Pods (core/v1): ``GET /api/v1/pods`` and ``/api/v1/namespaces/{ns}/pods`` with ``fieldSelector``
  (``spec.nodeName``, ``metadata.name``, ``metadata.namespace``, ``status.phase``; ``=``, ``==``, ``!=``)
  and ``labelSelector`` (equality), ``GET`` / ``DELETE /api/v1/namespaces/{ns}/pods/{name}``.
* The Eviction subresource: ``POST /api/v1/namespaces/{ns}/pods/{name}/eviction`` with a policy/v1
  ``Eviction``: 201 and the pod starts terminating (``deletionTimestamp`` = now + its grace period; it is
  gone then, unless it was added ``stuck``: a pod on a host whose kubelet is down); 429 with a
  ``Status`` naming the PodDisruptionBudget when the eviction would violate it; 500 when more than one
  budget covers the pod; 404 for a pod that does not exist.  An already terminating or finished pod is
  evicted without consulting budgets, as the real server does.
* PodDisruptionBudgets (policy/v1): ``GET /apis/policy/v1/poddisruptionbudgets``,
  ``/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets[/{name}]``, with ``minAvailable`` or
  ``maxUnavailable`` (a number or a percentage) over a ``matchLabels`` / ``matchExpressions`` selector and a
  computed ``status`` (``currentHealthy``, ``desiredHealthy``, ``expectedPods``, ``disruptionsAllowed``).
  The expected count of pods is the matching pods that are not terminating (what the real server reads from
  the owning controllers' scale).

What controllers would do is played lazily, on each request, from the clock: a terminating pod disappears
when its grace period is over; ``reschedule_to(node, ready_after)`` makes every evicted pod that a
ReplicaSet or StatefulSet owns come back as a replacement on ``node`` that turns Ready ``ready_after``
seconds later (so a budget refuses until then).  Every request is recorded (``requests``), and every
eviction with its answer (``evictions``).  Requests need the bearer token of the generated kubeconfig.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-kube-token"     # the bearer token of the generated kubeconfig
REPLACED_KINDS = ("ReplicaSet", "StatefulSet")


@dataclass
class FakePod:
    namespace: str
    name: str
    node: str
    labels: dict[str, str]
    owner: tuple[str, str] | None            # (kind, name) of the controlling owner
    annotations: dict[str, str]
    phase: str
    ready_at: float | None                   # monotonic time it is (was) Ready from; None: never
    grace: float                             # terminationGracePeriodSeconds
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: str = field(default_factory=lambda: _now())
    deleted_at: str | None = None            # deletionTimestamp
    gone_at: float | None = None             # monotonic time it disappears
    stuck: bool = False                      # its kubelet is down: once deleted it stays, terminating, for ever
    resource_version: int = 0

    def ready(self, now: float) -> bool:
        return self.ready_at is not None and now >= self.ready_at and self.phase == "Running"


@dataclass
class FakePdb:
    namespace: str
    name: str
    match_labels: dict[str, str]
    match_expressions: list[dict[str, Any]]
    min_available: int | str | None
    max_unavailable: int | str | None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    resource_version: int = 0


def _now(later: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=later)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Success" if code < 300 else "Failure", "code": code}
    if code >= 300:
        body.update(message=message, reason=reason)
    if details:
        body["details"] = details
    return body


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 merge (what strategic merge does for maps, scalars and atomic lists)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _has_directive(patch: Any) -> bool:
    """Whether a strategic merge patch uses ``$patch`` / ``$retainKeys``-style directives (the fake does not)."""
    if isinstance(patch, dict):
        return any(str(k).startswith("$") or _has_directive(v) for k, v in patch.items())
    if isinstance(patch, list):
        return any(_has_directive(v) for v in patch)
    return False


def _scaled(value: int | str, total: int, *, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    percent = int(value.rstrip("%"))
    whole, rest = divmod(percent * total, 100)
    return whole + (1 if round_up and rest else 0)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.body = _status(code, reason, message, **details)


class FakeKube:
    """The cluster's state and the server that serves it.  Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.pdbs: dict[tuple[str, str], FakePdb] = {}
        self.requests: list[tuple[str, str, str]] = []        # (method, path with query, content type)
        self.evictions: list[tuple[str, int]] = []            # ("ns/name", HTTP status)
        self._versions = itertools.count(1)
        self._replacements = itertools.count(1)
        self._reschedule: tuple[str, float] | None = None
        self._faults: list[list[Any]] = []                    # [method, path part, status, times left]
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the server -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kubeconfig(self, directory: Path, *, context: str = "fake") -> Path:
        """A kubeconfig for this server (the same shape ``kubectl`` writes), in ``directory``."""
        path = directory / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "roost", "user": {"token": TOKEN}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "roost"}}]}))
        return path

    # -- what a test sets up --------------------------------------------------------------------------

    def add_node(self, name: str, *, unschedulable: bool = False, taints: list[dict[str, str]] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        with self.lock:
            spec: dict[str, Any] = {}
            if unschedulable:
                spec["unschedulable"] = True
            if taints:
                spec["taints"] = taints
            self.nodes[name] = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                             "resourceVersion": str(next(self._versions)),
                             "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
                "spec": spec,
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}

    def add_pod(self, name: str, node: str, *, namespace: str = "default", labels: dict[str, str] | None = None,
                owner: tuple[str, str] | None = ("ReplicaSet", "app"), mirror: bool = False, phase: str = "Running",
                ready: bool = True, grace: float = 0.0, stuck: bool = False) -> None:
        with self.lock:
            pod = FakePod(namespace=namespace, name=name, node=node, labels=dict(labels or {}), owner=owner,
                          annotations={"kubernetes.io/config.mirror": "abc"} if mirror else {}, phase=phase,
                          ready_at=time.monotonic() if ready else None, grace=grace,
                          resource_version=next(self._versions), stuck=stuck)
            self.pods[(namespace, name)] = pod

    def add_pdb(self, name: str, *, namespace: str = "default", match_labels: dict[str, str] | None = None,
                match_expressions: list[dict[str, Any]] | None = None, min_available: int | str | None = None,
                max_unavailable: int | str | None = None) -> None:
        with self.lock:
            self.pdbs[(namespace, name)] = FakePdb(namespace, name, dict(match_labels or {}),
                                                   list(match_expressions or []), min_available, max_unavailable,
                                                   resource_version=next(self._versions))

    def remove_pdb(self, name: str, *, namespace: str = "default") -> None:
        with self.lock:
            self.pdbs.pop((namespace, name), None)

    def reschedule_to(self, node: str, *, ready_after: float) -> None:
        """Evicted ReplicaSet / StatefulSet pods come back on ``node``, Ready ``ready_after`` seconds later."""
        with self.lock:
            self._reschedule = (node, ready_after)

    def fail_next(self, method: str, path_part: str, status: int, *, times: int = 1) -> None:
        """Answer the next ``times`` ``method`` requests whose path contains ``path_part`` with ``status`` (409: a
        Conflict, as after a concurrent write; 5xx: the API server in trouble)."""
        with self.lock:
            self._faults.append([method, path_part, status, times])

    # -- what a test reads ----------------------------------------------------------------------------

    def node(self, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.nodes[name])

    def unschedulable(self, name: str) -> bool:
        return bool(self.node(name)["spec"].get("unschedulable"))

    def taints(self, name: str) -> list[dict[str, str]]:
        return list(self.node(name)["spec"].get("taints") or [])

    def pod_names(self, node: str) -> set[str]:
        """The pods bound to ``node`` now (terminating ones included)."""
        with self.lock:
            self._tick()
            return {p.name for p in self.pods.values() if p.node == node}

    def evicted(self, status: int = 201) -> list[str]:
        with self.lock:
            return [ref for ref, code in self.evictions if code == status]

    # -- the cluster's clock --------------------------------------------------------------------------

    def _tick(self) -> None:
        """What time did: terminating pods whose grace is over are gone."""
        now = time.monotonic()
        for key, pod in list(self.pods.items()):
            if pod.gone_at is not None and now >= pod.gone_at:
                del self.pods[key]

    # -- JSON -----------------------------------------------------------------------------------------

    def _pod_json(self, pod: FakePod, now: float) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                                    "resourceVersion": str(pod.resource_version), "creationTimestamp": pod.created,
                                    "labels": pod.labels}
        if pod.annotations:
            metadata["annotations"] = pod.annotations
        if pod.owner is not None:
            kind, name = pod.owner
            metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": name,
                                            "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, name)), "controller": True,
                                            "blockOwnerDeletion": True}]
        if pod.deleted_at is not None:
            metadata["deletionTimestamp"] = pod.deleted_at
            metadata["deletionGracePeriodSeconds"] = int(pod.grace)
        ready = "True" if pod.ready(now) else "False"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"nodeName": pod.node, "terminationGracePeriodSeconds": int(pod.grace),
                         "containers": [{"name": "main", "image": "registry.example/app:1"}]},
                "status": {"phase": pod.phase, "conditions": [{"type": "Ready", "status": ready}]}}

    def _pdb_json(self, pdb: FakePdb, now: float) -> dict[str, Any]:
        status = self._pdb_status(pdb, now)
        spec: dict[str, Any] = {"selector": {"matchLabels": pdb.match_labels}}
        if pdb.match_expressions:
            spec["selector"]["matchExpressions"] = pdb.match_expressions
        if pdb.min_available is not None:
            spec["minAvailable"] = pdb.min_available
        if pdb.max_unavailable is not None:
            spec["maxUnavailable"] = pdb.max_unavailable
        return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": pdb.name, "namespace": pdb.namespace, "uid": pdb.uid,
                             "resourceVersion": str(pdb.resource_version)},
                "spec": spec, "status": {**status, "observedGeneration": 1}}

    # -- budgets --------------------------------------------------------------------------------------

    @staticmethod
    def _selects(pdb: FakePdb, pod: FakePod) -> bool:
        if pod.namespace != pdb.namespace:
            return False
        if any(pod.labels.get(k) != v for k, v in pdb.match_labels.items()):
            return False
        for expr in pdb.match_expressions:
            key, op, values = expr["key"], expr["operator"], expr.get("values") or []
            has = key in pod.labels
            if (op == "In" and pod.labels.get(key) not in values) or (op == "NotIn" and has and
                                                                     pod.labels[key] in values):
                return False
            if (op == "Exists" and not has) or (op == "DoesNotExist" and has):
                return False
        return bool(pdb.match_labels or pdb.match_expressions)

    def _pdb_status(self, pdb: FakePdb, now: float) -> dict[str, int]:
        pods = [p for p in self.pods.values() if self._selects(pdb, p) and p.deleted_at is None
                and p.phase not in ("Succeeded", "Failed")]
        expected = len(pods)
        healthy = sum(1 for p in pods if p.ready(now))
        if pdb.min_available is not None:
            desired = _scaled(pdb.min_available, expected, round_up=True)
        else:
            desired = expected - _scaled(pdb.max_unavailable or 0, expected, round_up=True)
        return {"currentHealthy": healthy, "desiredHealthy": max(desired, 0), "expectedPods": expected,
                "disruptionsAllowed": max(0, healthy - desired)}

    # -- the API --------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append((method, target, content_type))
            self._tick()
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [p for p in url.path.split("/") if p]
            for fault in self._faults:
                if fault[0] == method and fault[1] in url.path and fault[3] > 0:
                    fault[3] -= 1
                    reason = {409: "Conflict", 429: "TooManyRequests"}.get(fault[2], "InternalError")
                    return fault[2], _status(fault[2], reason, f"injected {fault[2]} ({reason})")
            try:
                return 200, self._route(method, parts, query, content_type, body)
            except _Created as created:
                return 201, created.body
            except ApiError as exc:
                return exc.code, exc.body

    def _route(self, method: str, parts: list[str], query: dict[str, str], content_type: str,
               body: bytes) -> dict[str, Any]:
        now = time.monotonic()
        match parts:
            case ["api", "v1", "nodes"] if method == "GET":
                return {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": self._rv()},
                        "items": [copy.deepcopy(n) for n in self.nodes.values()]}
            case ["api", "v1", "nodes", name] if method == "GET":
                return copy.deepcopy(self._node(name))
            case ["api", "v1", "nodes", name] if method == "PATCH":
                return self._patch_node(name, content_type, body)
            case ["api", "v1", "pods"] if method == "GET":
                return self._list_pods(None, query, now)
            case ["api", "v1", "namespaces", ns, "pods"] if method == "GET":
                return self._list_pods(ns, query, now)
            case ["api", "v1", "namespaces", ns, "pods", name] if method == "GET":
                return self._pod_json(self._pod(ns, name), now)
            case ["api", "v1", "namespaces", ns, "pods", name] if method == "DELETE":
                pod = self._pod(ns, name)
                self._terminate(pod, None, now)
                return self._pod_json(pod, now)
            case ["api", "v1", "namespaces", ns, "pods", name, "eviction"] if method == "POST":
                return self._evict(ns, name, body, now)
            case ["apis", "policy", "v1", "poddisruptionbudgets"] if method == "GET":
                return self._pdb_list(None, now)
            case ["apis", "policy", "v1", "namespaces", ns, "poddisruptionbudgets"] if method == "GET":
                return self._pdb_list(ns, now)
            case ["apis", "policy", "v1", "namespaces", ns, "poddisruptionbudgets", name] if method == "GET":
                pdb = self.pdbs.get((ns, name))
                if pdb is None:
                    raise ApiError(404, "NotFound", f'poddisruptionbudgets.policy "{name}" not found',
                                   name=name, group="policy", kind="poddisruptionbudgets")
                return self._pdb_json(pdb, now)
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _rv(self) -> str:
        return str(next(self._versions))

    def _node(self, name: str) -> dict[str, Any]:
        node = self.nodes.get(name)
        if node is None:
            raise ApiError(404, "NotFound", f'nodes "{name}" not found', name=name, kind="nodes")
        return node

    def _pod(self, namespace: str, name: str) -> FakePod:
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        return pod

    def _patch_node(self, name: str, content_type: str, body: bytes) -> dict[str, Any]:
        node = self._node(name)
        kind = content_type.split(";")[0].strip()
        try:
            patch = json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "the patch is not valid JSON") from None
        if kind == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                                                  "[]handlers.jsonPatchOp")
            raise ApiError(415, "UnsupportedMediaType", "the fake serves merge patches only")
        if kind not in ("application/strategic-merge-patch+json", "application/merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: application/json-patch+json, "
                                                        f"application/merge-patch+json, "
                                                        f"application/strategic-merge-patch+json (got {kind})")
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "the patch is not a JSON object")
        if _has_directive(patch):
            raise ApiError(400, "BadRequest", "strategic merge directives are not supported by the fake")
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        current = node["metadata"]["resourceVersion"]
        if wanted is not None and wanted != current:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object has been '
                                            "modified; please apply your changes to the latest version and try again",
                           name=name, kind="nodes")
        merged = _merge(node, patch)
        merged["metadata"]["name"] = name
        spec = merged.setdefault("spec", {})
        if spec.get("unschedulable") is False:      # omitempty: false is not written back
            del spec["unschedulable"]
        if spec.get("taints") == []:
            del spec["taints"]
        for taint in spec.get("taints", []):
            if taint.get("effect") not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not taint.get("key"):
                raise ApiError(422, "Invalid", f'Node "{name}" is invalid: spec.taints: Invalid value: {taint}')
        merged["metadata"]["resourceVersion"] = self._rv()
        self.nodes[name] = merged
        return copy.deepcopy(merged)

    def _list_pods(self, namespace: str | None, query: dict[str, str], now: float) -> dict[str, Any]:
        pods = [p for p in self.pods.values() if namespace is None or p.namespace == namespace]
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            pods = self._field_filter(pods, term)
        for term in filter(None, query.get("labelSelector", "").split(",")):
            key, negate, value = self._term(term)
            pods = [p for p in pods if (p.labels.get(key) == value) != negate]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": self._rv()},
                "items": [self._pod_json(p, now) for p in pods]}

    @staticmethod
    def _term(term: str) -> tuple[str, bool, str]:
        for op, negate in (("!=", True), ("==", False), ("=", False)):
            if op in term:
                key, _, value = term.partition(op)
                return key.strip(), negate, value.strip()
        raise ApiError(400, "BadRequest", f'invalid selector: "{term}"; unable to parse requirement')

    def _field_filter(self, pods: list[FakePod], term: str) -> list[FakePod]:
        key, negate, value = self._term(term)
        fields = {"spec.nodeName": lambda p: p.node, "metadata.name": lambda p: p.name,
                  "metadata.namespace": lambda p: p.namespace, "status.phase": lambda p: p.phase}
        if key not in fields:
            raise ApiError(400, "BadRequest", f'field label not supported: {key}')
        return [p for p in pods if (fields[key](p) == value) != negate]

    def _pdb_list(self, namespace: str | None, now: float) -> dict[str, Any]:
        return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudgetList",
                "metadata": {"resourceVersion": self._rv()},
                "items": [self._pdb_json(p, now) for p in self.pdbs.values()
                          if namespace is None or p.namespace == namespace]}

    def _evict(self, namespace: str, name: str, body: bytes, now: float) -> dict[str, Any]:
        try:
            eviction = json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "the eviction is not valid JSON") from None
        if eviction.get("kind") != "Eviction" or eviction.get("apiVersion") not in ("policy/v1", "policy/v1beta1"):
            raise ApiError(400, "BadRequest", f"expected a policy/v1 Eviction, got {eviction.get('apiVersion')}/"
                                              f"{eviction.get('kind')}")
        if (eviction.get("metadata") or {}).get("name") != name:
            raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
        ref = f"{namespace}/{name}"
        try:
            pod = self._pod(namespace, name)
        except ApiError as exc:
            self.evictions.append((ref, exc.code))
            raise
        grace = (eviction.get("deleteOptions") or {}).get("gracePeriodSeconds")
        if pod.deleted_at is None and pod.phase not in ("Succeeded", "Failed"):
            budgets = [b for b in self.pdbs.values() if self._selects(b, pod)]
            if len(budgets) > 1:
                self.evictions.append((ref, 500))
                raise ApiError(500, "InternalError", "This pod has more than one PodDisruptionBudget, which the "
                                                     "eviction subresource does not support.")
            if budgets:
                budget = budgets[0]
                status = self._pdb_status(budget, now)
                blocked = (status["disruptionsAllowed"] <= 0 if pod.ready(now)
                           else status["currentHealthy"] < status["desiredHealthy"])
                if blocked:
                    self.evictions.append((ref, 429))
                    raise ApiError(
                        429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                        causes=[{"reason": "DisruptionBudget",
                                 "message": f"The disruption budget {budget.name} needs {status['desiredHealthy']} "
                                            f"healthy pods and has {status['currentHealthy']} currently"}])
        self.evictions.append((ref, 201))
        self._terminate(pod, grace, now)
        raise _Created(_status(201, "", ""))

    def _terminate(self, pod: FakePod, grace: float | None, now: float) -> None:
        if pod.deleted_at is not None:
            return
        pod.grace = pod.grace if grace is None else float(grace)
        pod.deleted_at = _now(pod.grace)          # when it should be gone, as the real server writes it
        pod.gone_at = None if pod.stuck else now + pod.grace
        pod.resource_version = next(self._versions)
        if self._reschedule is not None and pod.owner is not None and pod.owner[0] in REPLACED_KINDS:
            node, ready_after = self._reschedule
            base = pod.name.rsplit("-r", 1)[0]
            replacement = FakePod(namespace=pod.namespace, name=f"{base}-r{next(self._replacements)}", node=node,
                                  labels=dict(pod.labels), owner=pod.owner, annotations={}, phase="Running",
                                  ready_at=now + ready_after, grace=pod.grace, resource_version=next(self._versions))
            self.pods[(replacement.namespace, replacement.name)] = replacement


class _Created(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("created")
        self.body = body


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16                  # the status line, headers and body leave in one write (no delayed-ACK stall)
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the requests are recorded on the fake."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            code, reply = 401, _status(401, "Unauthorized", "Unauthorized")
        else:
            code, reply = self.kube.handle(self.command, self.path, self.headers.get("Content-Type") or "", body)
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_DELETE = do_PUT = _serve


@contextlib.contextmanager
def fake_kube() -> Iterator[FakeKube]:
    with FakeKube() as kube:
        yield kube
