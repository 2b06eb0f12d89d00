"""Host maintenance on the Kubernetes side: what a lock and an unlock of a host do to its node.

The node of a host is the node named like the host's hostname.

**lock** (inventory asks before it locks a host, and waits for the answer):

1. cordon: ``spec.unschedulable = true``, and the label ``roost.io/maintenance=draining`` that says roost did it;
2. drain, in rounds every ``poll_interval``: list the pods bound to the node; ask the Eviction API (policy/v1)
   to evict each one that must leave (DaemonSet pods, mirror pods and finished pods stay, as with
   ``kubectl drain --ignore-daemonsets``; pods no controller owns and pods with emptyDir volumes go too, as
   with ``--force --delete-emptydir-data``, which StarlingX uses: a locked host runs nothing); a 429 means
   a PodDisruptionBudget does not allow it yet: ask again next round; wait until every evicted pod is gone
   (one still terminating ``skip_wait_after`` seconds past its deletionTimestamp is not waited for: its
   kubelet is down);
3. taint: ``roost.io/locked=true:NoExecute`` (the key is configurable), label ``roost.io/maintenance=locked``;
   the answer is *done*.

If the pods have not all left within ``drain_timeout`` (or the command's deadline, if sooner), or the API
refuses something for good, the lock fails: the answer is *not done*, naming each pod still there and why
(the disruption budget's own words).  A failed lock leaves the host unlocked in inventory, so the node is
put back in service too: uncordoned (unless somebody else had cordoned it before the lock), label removed,
no taint.  That is what an operator expects from StarlingX, where a lock that cannot disable the host's
services leaves the host unlocked and working; a half-drained, cordoned node under an unlocked host would
be a silent loss of capacity.  Pods already evicted are not brought back: their controllers have
rescheduled them elsewhere, as after any eviction.

**force-lock** does not wait: cordon, one eviction request per pod (refusals are not retried), taint, then
the answer at once.  The NoExecute taint removes what the budgets refused (the taint manager does not
consult PodDisruptionBudgets): a force-lock is the operator overriding them.

**unlock**: remove roost's taint, uncordon, remove the label, then read the node again to check.

Every step reads the node and patches it with the ``resourceVersion`` it read (a concurrent writer
means read again and retry), and does nothing when the node is already as wanted: a repeated command is
harmless.  A node missing from the cluster is reported as such (*done*: nothing runs there).  With no
Kubernetes configured, every command is *done* with a detail saying the node steps were skipped.

Commands for one node run one at a time, in order.  A force-lock or an unlock interrupts a lock that is
still draining (which then answers *not done*, superseded, and leaves the node to the newer command); a
command issued before one already carried out for the same node (a stale redelivery) does nothing and
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from services.orchestrator import metrics
from services.orchestrator.kube import KubeApi, KubeConflict, KubeError, Node, NodeChange, Pod, Taint

log = structlog.get_logger("roost.orchestrator.maintenance")

MAINTENANCE_LABEL = "roost.io/maintenance"
DRAINING = "draining"
LOCKED = "locked"
DETAIL_MAX = 1024
UPDATE_ATTEMPTS = 5
SKIPPED = "no Kubernetes is configured: the node steps (cordon, drain, taint) were skipped"


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to a host-services command, and the outcome it counts as."""

    done: bool
    detail: str
    outcome: str

    def __post_init__(self) -> None:
        if len(self.detail) > DETAIL_MAX:
            object.__setattr__(self, "detail", self.detail[:DETAIL_MAX - 1] + "…")


@dataclass
class _NodeState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    interrupt: asyncio.Event | None = None      # set: the drain in flight stops (a newer command took over)
    latest: datetime | None = None              # issue time of the latest command carried out

    def supersedes(self, issued: datetime | None) -> bool:
        """A command carried out here was issued after ``issued``."""
        return issued is not None and self.latest is not None and issued < self.latest


@dataclass
class _Drain:
    """How a drain went."""

    complete: bool = False              # the last list showed no pod that must leave
    evicted: int = 0
    stayed: int = 0                     # DaemonSet, mirror and finished pods left on the node
    overdue: int = 0                    # terminating pods whose kubelet does not remove them: not waited for
    left: dict[str, str] = field(default_factory=dict)      # pod ref -> why it is still there
    interrupted: bool = False
    error: str | None = None            # a refusal that no retry will change
    api_error: str | None = None        # the last transient API failure (retried)


def _seconds(value: float) -> str:
    """``90``, ``1.5``: seconds for a reader, to a tenth."""
    return f"{value:.1f}".removesuffix(".0")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


class HostMaintenance:
    """Lock and unlock on the Kubernetes side; ``kube`` None: no Kubernetes configured."""

    def __init__(self, kube: KubeApi | None, *, drain_timeout: float = 90.0, poll_interval: float = 2.0,
                 grace_seconds: int | None = None, taint_key: str = "roost.io/locked",
                 skip_wait_after: float = 60.0, deadline_margin: float = 2.0) -> None:
        self.kube = kube
        self.skip_wait_after = skip_wait_after
        self.drain_timeout = drain_timeout
        self.poll_interval = poll_interval
        self.grace_seconds = grace_seconds
        self.taint = Taint(key=taint_key, value="true", effect="NoExecute")
        self.deadline_margin = deadline_margin
        self._nodes: dict[str, _NodeState] = {}

    # -- the commands ---------------------------------------------------------------------------------

    async def disable(self, node: str, *, force: bool = False, issued: datetime | None = None,
                      deadline: datetime | None = None) -> Result:
        """Lock (``force``: force-lock) the host's node.  ``issued``: when the command was sent (stale ones do
        nothing); ``deadline``: the command's deadline, which bounds the drain."""
        action = "force-lock" if force else "lock"
        if force:
            return await self._run(node, action, issued, self._force_lock, interrupts=True)
        budget = self.drain_timeout
        if deadline is not None:
            budget = min(budget, (deadline - datetime.now(UTC)).total_seconds() - self.deadline_margin)
        return await self._run(node, action, issued, lambda n, stop: self._lock(n, max(budget, 0.0), stop),
                               interrupts=False)

    async def enable(self, node: str, *, issued: datetime | None = None) -> Result:
        """Unlock: the host's node back in service."""
        return await self._run(node, "unlock", issued, self._unlock, interrupts=True)

    async def _run(self, node: str, action: str, issued: datetime | None,
                   work: Callable[[str, asyncio.Event], Awaitable[Result]], *, interrupts: bool) -> Result:
        started = time.monotonic()
        if self.kube is None:
            result = Result(True, SKIPPED, "skipped")
        else:
            state = self._nodes.setdefault(node, _NodeState())
            if interrupts and state.interrupt is not None and not state.supersedes(issued):
                # a lock still draining gives way to this command; not to one sent before it (an unlock's
                # enable delivered late), which it supersedes anyway
                state.interrupt.set()
            async with state.lock:
                if state.supersedes(issued):
                    result = Result(False, f"{action} of node {node}: a later command for it was already carried "
                                           "out; nothing done", "superseded")
                else:
                    if issued is not None:
                        state.latest = issued
                    stop = state.interrupt = asyncio.Event()
                    try:
                        result = await work(node, stop)
                    finally:
                        state.interrupt = None
        seconds = time.monotonic() - started
        metrics.record_drain(action, result.outcome, seconds)
        log.info("host services command carried out", node=node, action=action, done=result.done,
                 outcome=result.outcome, seconds=round(seconds, 3), detail=result.detail)
        return result

    # -- lock -----------------------------------------------------------------------------------------

    async def _lock(self, name: str, budget: float, stop: asyncio.Event) -> Result:
        kube = self._kube()
        try:
            node = await kube.read_node(name)
        except KubeError as exc:
            return Result(False, f"lock: cannot read node {name}: {exc}", "failed")
        if node is None:
            return Result(True, f"no Kubernetes node {name}: nothing to drain", "no-node")
        already_locked = node.labels.get(MAINTENANCE_LABEL) == LOCKED
        cordoned_by_others = node.unschedulable and MAINTENANCE_LABEL not in node.labels
        try:
            if await self._update(name, self._cordon) is None:
                return Result(True, f"no Kubernetes node {name} (deleted meanwhile): nothing to drain", "no-node")
            drain = await self._drain(name, budget, stop)
        except KubeError as exc:
            drain = _Drain(error=f"the Kubernetes API refused: {exc}")
        if drain.interrupted:
            return Result(False, f"lock of node {name} interrupted by a later command for it", "superseded")
        if drain.complete:
            try:
                await self._update(name, self._add_taint)
            except KubeError as exc:
                drain.error = f"cannot taint it: {exc}"
            else:
                stayed = (f" ({_plural(drain.stayed, 'DaemonSet, mirror or finished pod')} left in place)"
                          if drain.stayed else "")
                if drain.overdue:
                    stayed += (f"; {_plural(drain.overdue, 'pod')} still terminating well past its grace period "
                               "(its kubelet does not answer) not waited for")
                return Result(True, f"node {name} cordoned, {_plural(drain.evicted, 'pod')} evicted{stayed}, "
                                    f"tainted {self.taint}", "done")
        left = "; ".join(f"{ref}: {reason}" for ref, reason in drain.left.items())
        why = drain.error or (f"drain timed out after {_seconds(budget)} s with {_plural(len(drain.left), 'pod')} "
                              f"left: {left}" + (f"; last API error: {drain.api_error}" if drain.api_error else ""))
        if already_locked:
            return Result(False, f"lock of node {name} failed: {why}; it was locked already and stays so", "failed")
        restored = await self._restore(name, uncordon=not cordoned_by_others)
        return Result(False, f"lock of node {name} failed: {why}; {restored}", "failed")

    async def _drain(self, name: str, budget: float, stop: asyncio.Event) -> _Drain:
        """Evict the node's pods until none that must leave is left, within ``budget`` seconds."""
        kube = self._kube()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        drain = _Drain()
        refused: dict[str, str] = {}
        while True:
            if stop.is_set():
                drain.interrupted = True
                return drain
            try:
                pods = await kube.pods_on_node(name)
                now = datetime.now(UTC)
                leaving = [p for p in pods if p.must_leave and not p.overdue(now, self.skip_wait_after)]
                drain.overdue = sum(1 for p in pods if p.must_leave and p.overdue(now, self.skip_wait_after))
                drain.stayed = len(pods) - len(leaving) - drain.overdue
                drain.left = {p.ref: refused.get(p.ref, "terminating" if p.terminating else "not evicted yet")
                              for p in leaving}
                if not leaving:
                    drain.complete = True
                    return drain
                await self._evict_all([p for p in leaving if not p.terminating], drain, refused)
            except KubeError as exc:
                if not exc.transient:
                    drain.error = f"the Kubernetes API refused: {exc}"
                    return drain
                drain.api_error = str(exc)
                log.warning("drain round failed; will retry", node=name, error=str(exc))
            left = deadline - loop.time()
            if left <= 0:
                return drain
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(self.poll_interval, left))

    async def _evict_all(self, pods: list[Pod], drain: _Drain, refused: dict[str, str]) -> None:
        """Ask for the pods' evictions at once (the client's thread pool bounds how many run together); the
        first error no retry will change is raised, else the first transient one, once all have answered."""
        outcomes = await asyncio.gather(*(self._evict(p, drain, refused) for p in pods), return_exceptions=True)
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        for error in errors:
            if not isinstance(error, KubeError) or not error.transient:
                raise error
        if errors:
            raise errors[0]

    async def _evict(self, pod: Pod, drain: _Drain, refused: dict[str, str]) -> None:
        kube = self._kube()
        try:
            eviction = await kube.evict(pod, self.grace_seconds)
        except KubeError:
            metrics.record_eviction("error")
            raise
        metrics.record_eviction(eviction.outcome)
        if eviction.outcome == "evicted":
            drain.evicted += 1
            refused.pop(pod.ref, None)
            drain.left[pod.ref] = "evicted, terminating"
        elif eviction.outcome == "refused":
            if pod.ref not in refused:
                log.info("eviction refused; will ask again until the drain times out", pod=pod.ref,
                         detail=eviction.detail)
            refused[pod.ref] = f"eviction refused: {eviction.detail}"
            drain.left[pod.ref] = refused[pod.ref]
        else:
            drain.left.pop(pod.ref, None)

    # -- force-lock -----------------------------------------------------------------------------------

    async def _force_lock(self, name: str, _stop: asyncio.Event) -> Result:
        kube = self._kube()
        try:
            node = await kube.read_node(name)
            if node is None:
                return Result(True, f"no Kubernetes node {name}: nothing to drain", "no-node")
            await self._update(name, self._cordon)
            evicted = refused = 0
            for pod in await kube.pods_on_node(name):
                if not pod.must_leave or pod.terminating:
                    continue
                try:
                    eviction = await kube.evict(pod, self.grace_seconds)
                except KubeError as exc:
                    metrics.record_eviction("error")
                    log.warning("force-lock: eviction failed; the taint removes the pod", pod=pod.ref, error=str(exc))
                    refused += 1
                    continue
                metrics.record_eviction(eviction.outcome)
                evicted += eviction.outcome == "evicted"
                refused += eviction.outcome == "refused"
            await self._update(name, self._add_taint)
        except KubeError as exc:
            return Result(False, f"force-lock of node {name}: the Kubernetes API refused: {exc}", "failed")
        more = (f"; {_plural(refused, 'pod')} not evicted (disruption budget or error) are removed by the taint "
                "without honouring budgets") if refused else ""
        return Result(True, f"force-lock: node {name} cordoned and tainted {self.taint}, "
                            f"{_plural(evicted, 'pod')} evicted without waiting{more}", "done")

    # -- unlock ---------------------------------------------------------------------------------------

    async def _unlock(self, name: str, _stop: asyncio.Event) -> Result:
        kube = self._kube()
        try:
            before = await kube.read_node(name)
            if before is None:
                return Result(True, f"no Kubernetes node {name}: nothing to enable", "no-node")
            await self._update(name, self._back_in_service)
            after = await kube.read_node(name)
        except KubeError as exc:
            return Result(False, f"unlock of node {name}: the Kubernetes API refused: {exc}", "failed")
        if after is not None and (after.unschedulable or after.has_taint(self.taint)):
            return Result(False, f"node {name} is still cordoned or tainted after the unlock (another writer?); "
                                 f"run `kubectl uncordon {name}` and `kubectl taint nodes {name} {self.taint.key}-`",
                          "failed")
        if not before.unschedulable and not before.has_taint(self.taint):
            return Result(True, f"node {name} was already in service", "done")
        return Result(True, f"node {name} uncordoned, taint {self.taint.key} removed", "done")

    # -- node changes ---------------------------------------------------------------------------------

    def _cordon(self, node: Node) -> NodeChange | None:
        if node.unschedulable and node.labels.get(MAINTENANCE_LABEL) in (DRAINING, LOCKED):
            return None
        mark = LOCKED if node.labels.get(MAINTENANCE_LABEL) == LOCKED else DRAINING
        return NodeChange(unschedulable=True, labels={MAINTENANCE_LABEL: mark})

    def _add_taint(self, node: Node) -> NodeChange | None:
        if node.has_taint(self.taint) and node.labels.get(MAINTENANCE_LABEL) == LOCKED and node.unschedulable:
            return None
        taints = [t for t in node.taints if not t.same(self.taint)] + [self.taint]
        return NodeChange(unschedulable=True, taints=taints, labels={MAINTENANCE_LABEL: LOCKED})

    def _back_in_service(self, node: Node) -> NodeChange | None:
        if not node.unschedulable and not node.has_taint(self.taint) and MAINTENANCE_LABEL not in node.labels:
            return None
        return NodeChange(unschedulable=False, taints=[t for t in node.taints if not t.same(self.taint)],
                          labels={MAINTENANCE_LABEL: None})

    async def _restore(self, name: str, *, uncordon: bool) -> str:
        """After a failed lock: the node as before it (uncordoned unless somebody else had cordoned it)."""
        def change(node: Node) -> NodeChange | None:
            if MAINTENANCE_LABEL not in node.labels and (not uncordon or not node.unschedulable):
                return None
            return NodeChange(unschedulable=False if uncordon else None, labels={MAINTENANCE_LABEL: None})

        try:
            await self._update(name, change)
        except KubeError as exc:
            return f"the node could not be uncordoned again ({exc}): run `kubectl uncordon {name}`"
        if uncordon:
            return "the node is schedulable again and the host stays unlocked"
        return "the node stays cordoned, as it was before the lock; the host stays unlocked"

    async def _update(self, name: str, decide: Callable[[Node], NodeChange | None]) -> Node | None:
        """Read the node, patch it as ``decide`` says (nothing if None) against the version read; on a conflict
        read again and decide again.  None: the node is gone."""
        kube = self._kube()
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            node = await kube.read_node(name)
            if node is None:
                return None
            change = decide(node)
            if change is None:
                return node
            try:
                return await kube.change_node(node, change)
            except KubeConflict:
                if attempt == UPDATE_ATTEMPTS:
                    raise
                log.info("node changed while we changed it; reading it again", node=name, attempt=attempt)
        raise AssertionError("unreachable")

    def _kube(self) -> KubeApi:
        assert self.kube is not None
        return self.kube
