"""Host verdicts under a simulated clock: one path down -> degraded naming the network; all paths down and
confirmed -> failed within the bound; witnesses that still hear a host; 30 hosts at once -> multi-node
failure mode, nobody failed; recovery; and a property: no host that answers on some path is ever failed."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.heartbeat import HostHealth
from services.heartbeat.model import ALARM_MULTI_NODE, ALARM_NETWORK_LOST, AlarmIntent, Path
from services.heartbeat.paths import PathHealth, PathState
from services.heartbeat.verdict import HostVerdict, PathView, Verdict, VerdictPolicy

EXAMPLES = int(os.environ.get("ROOST_HEARTBEAT_EXAMPLES", "200"))
settings.register_profile("heartbeat", max_examples=EXAMPLES, deadline=None)
PROFILE = settings.get_profile("heartbeat")

TICK = 0.01          # the simulation's step
PERIOD_TICKS = 10    # a heartbeat every 100 ms


class Site:
    """A monitor's view of ``hosts``, each heartbeating on every path every period (phase by host), on a
    simulated clock; ``cut`` paths deliver nothing.  Records every verdict and alarm with its time."""

    def __init__(self, hosts: Iterable[str], policy: VerdictPolicy | None = None, *, loss: float = 0.0,
                 seed: int = 0) -> None:
        self.loss = loss
        self.rng = random.Random(seed)
        self.tick = 0
        self.hosts = list(hosts)
        self.health = {h: {p: PathHealth(0.0) for p in Path} for h in self.hosts}
        self.verdict = Verdict("site", policy)
        self.cut: set[tuple[str, Path]] = set()
        self.last_sent: dict[str, float] = {}
        self.events: list[tuple[float, HostVerdict]] = []
        self.alarms: list[tuple[float, AlarmIntent]] = []

    @property
    def now(self) -> float:
        return round(self.tick * TICK, 6)

    def kill(self, *hosts: str) -> None:
        self.cut |= {(h, p) for h in hosts for p in Path}

    def heal(self, *hosts: str) -> None:
        self.cut -= {(h, p) for h in hosts for p in Path}

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            self.tick += 1
            now = self.now
            changed = self.tick % PERIOD_TICKS == 0      # the verdict's own timers: once a period
            for i, host in enumerate(self.hosts):
                if (self.tick + i) % PERIOD_TICKS == 0:
                    for path, health in self.health[host].items():
                        if (host, path) not in self.cut and not (self.loss and self.rng.random() < self.loss):
                            changed |= health.heard(now, True) is not None
                            self.last_sent[host] = now
            for paths in self.health.values():
                for health in paths.values():
                    deadline = health.next_deadline()
                    if deadline is not None and deadline <= now + 1e-9:
                        changed |= health.advance(now) is not None
            if not changed:
                continue
            out = self.verdict.evaluate(now, {h: {p: PathView.of(x, now) for p, x in paths.items()}
                                              for h, paths in self.health.items()})
            self.events += [(now, v) for v in out.health]
            self.alarms += [(now, a) for a in out.alarms]

    def state(self, host: str) -> str | None:
        v = self.verdict.current(host)
        return v.state if v else None

    def failed_at(self, host: str) -> float | None:
        return next((t for t, v in self.events if v.hostname == host and v.state == "failed"), None)

    def raised(self) -> set[tuple[str, str]]:
        active: set[tuple[str, str]] = set()
        for _, a in self.alarms:
            key = (a.alarm_id, a.entity_instance_id)
            if a.raise_:
                active.add(key)
            else:
                active.discard(key)
        return active


def hosts(n: int) -> list[str]:
    return [f"worker-{i}" for i in range(n)]


def test_healthy_once_the_paths_are_up() -> None:
    site = Site(hosts(3))
    site.run(0.5)
    assert {v.hostname: v.state for _, v in site.events} == dict.fromkeys(hosts(3), "healthy")
    assert site.raised() == set()


def test_one_path_down_degrades_the_host_naming_the_network_then_recovers() -> None:
    site = Site(hosts(3))
    site.run(1.0)
    site.cut.add(("worker-1", Path.CLUSTER_HOST))
    site.run(1.5)
    assert site.verdict.current("worker-1") == HostVerdict("worker-1", "degraded", ("cluster-host",),
                                                           "heartbeat lost on cluster-host")
    assert site.raised() == {(ALARM_NETWORK_LOST, "host=worker-1.network=cluster-host")}
    event = site.verdict.current("worker-1").event("uuid-1", 7)  # type: ignore[union-attr]
    assert isinstance(event, HostHealth) and event.networks_down == ["cluster-host"]
    site.cut.clear()
    site.run(1.5)                                        # 10 good periods to come back
    assert site.state("worker-1") == "healthy" and site.raised() == set()
    assert [v.state for _, v in site.events if v.hostname == "worker-1"] == ["healthy", "degraded", "healthy"]


def test_a_dead_host_is_failed_within_a_second_of_its_last_heartbeat() -> None:
    site = Site(hosts(10))
    site.run(2.0)
    site.kill("worker-4")
    site.run(3.0)
    failed = site.failed_at("worker-4")
    assert failed is not None
    assert failed - site.last_sent["worker-4"] <= 1.0 + 1e-6
    assert site.verdict.current("worker-4") == HostVerdict(
        "worker-4", "failed", ("mgmt", "cluster-host", "oam"), "every path is down (no other node monitors it)")
    assert site.raised() == set()                         # 950.002 is inventory's, from the event
    assert all(site.state(h) == "healthy" for h in hosts(10) if h != "worker-4")


def test_the_950_003_alarms_of_a_failing_host_are_cleared_when_it_fails() -> None:
    site = Site(hosts(3))
    site.run(1.0)
    site.cut.add(("worker-0", Path.OAM))
    site.run(2.0)
    assert site.raised() == {(ALARM_NETWORK_LOST, "host=worker-0.network=oam")}
    site.kill("worker-0")
    site.run(2.0)
    assert site.state("worker-0") == "failed" and site.raised() == set()


def test_a_failed_host_that_answers_again_recovers() -> None:
    site = Site(hosts(3))
    site.run(1.0)
    site.kill("worker-2")
    site.run(2.0)
    assert site.state("worker-2") == "failed"
    site.heal("worker-2")
    site.run(0.5)
    assert site.state("worker-2") == "failed"            # damping: not after a few heartbeats
    site.run(1.0)
    assert site.state("worker-2") == "healthy"


def test_a_witness_that_still_hears_the_host_prevents_the_failure() -> None:
    site = Site(hosts(3))
    site.run(1.0)
    site.kill("worker-1")
    for _ in range(30):
        site.verdict.witness_report(site.now, "controller-1", {"worker-1": frozenset({Path.MGMT})})
        site.run(0.1)
    current = site.verdict.current("worker-1")
    assert current is not None and current.state == "degraded"
    assert current.networks_down == ("mgmt", "cluster-host", "oam") and "controller-1 still hear" in current.reason
    site.verdict.witness_report(site.now, "controller-1", {"worker-1": frozenset()})
    site.run(0.1)
    assert site.state("worker-1") == "failed"
    current = site.verdict.current("worker-1")
    assert current is not None and "confirmed by controller-1" in current.reason


def test_a_known_witness_that_went_quiet_delays_the_failure_only_until_it_expires() -> None:
    site = Site(hosts(3), VerdictPolicy(witness_expiry=3.0))
    site.run(1.0)
    site.verdict.witness_report(site.now, "controller-1", {"worker-1": frozenset(Path)})
    site.kill("worker-1")
    site.run(1.5)
    assert site.state("worker-1") == "degraded"          # controller-1's report is stale: no confirmation
    site.run(2.0)
    assert site.state("worker-1") == "failed"


def test_thirty_hosts_at_once_is_multi_node_failure_mode_and_nobody_fails() -> None:
    site = Site(hosts(40))
    site.run(2.0)
    site.kill(*hosts(30))
    site.run(5.0)
    assert site.verdict.mnfa == frozenset(Path)
    assert all(v.state != "failed" for _, v in site.events)
    assert {site.state(h) for h in hosts(30)} == {"degraded"}
    assert site.raised() == {(ALARM_MULTI_NODE, f"system=site.network={p.network}") for p in Path}
    # a host that dies while the mode is on is not failed either
    site.kill("worker-35")
    site.run(3.0)
    assert site.state("worker-35") == "degraded"
    site.heal(*hosts(40))
    site.run(2.0)
    assert site.verdict.mnfa == frozenset(Path)          # hysteresis: held a while after they are back
    site.run(5.0)
    assert site.verdict.mnfa == frozenset() and site.raised() == set()
    assert {site.state(h) for h in hosts(40)} == {"healthy"}


def test_a_few_hosts_at_once_are_failed_each() -> None:
    site = Site(hosts(40))                                # threshold max(3, 10 % of 40) = 4
    site.run(2.0)
    site.kill(*hosts(3))
    site.run(2.0)
    assert site.verdict.mnfa == frozenset()
    assert {site.state(h) for h in hosts(3)} == {"failed"}


def test_hosts_still_silent_when_the_mode_ends_fail_then() -> None:
    site = Site(hosts(20), VerdictPolicy(mnfa_exit_hold=1.0))
    site.run(2.0)
    site.kill(*hosts(10))
    site.run(3.0)
    assert site.verdict.mnfa and not any(v.state == "failed" for _, v in site.events)
    site.heal(*hosts(10)[1:])
    site.run(4.0)
    assert site.verdict.mnfa == frozenset()
    assert site.state("worker-0") == "failed"


def test_mnfa_timeout_ends_the_mode() -> None:
    site = Site(hosts(10), VerdictPolicy(mnfa_timeout=3.0))
    site.run(1.0)
    site.kill(*hosts(5))
    site.run(2.0)
    deadline = site.verdict.next_deadline()
    assert site.verdict.mnfa and deadline is not None and 2.0 < deadline <= 4.5
    site.run(2.5)
    assert site.verdict.mnfa == frozenset() and site.state("worker-0") == "failed"


def test_a_host_with_no_path_established_has_no_verdict_and_a_removed_host_is_forgotten() -> None:
    verdict = Verdict("site")
    out = verdict.evaluate(0.0, {"w": {p: PathView(PathState.UNKNOWN, 0.0) for p in Path}})
    assert out.health == () and verdict.current("w") is None
    views = {p: PathView(PathState.UP, 0.0) for p in Path} | {Path.OAM: PathView(PathState.DOWN, 2.0)}
    out = verdict.evaluate(1.0, {"w": views})
    assert [a.entity_instance_id for a in out.alarms] == ["host=w.network=oam"]
    assert verdict.alarms() == out.alarms
    out = verdict.evaluate(2.0, {})
    assert verdict.current("w") is None and [(a.alarm_id, a.raise_) for a in out.alarms] == [
        (ALARM_NETWORK_LOST, False)]


@PROFILE
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(Path)), st.booleans(),
                          st.integers(1, 15)), max_size=12),
       st.floats(0.0, 0.2), st.integers(0, 2**32 - 1))
def test_a_host_that_answers_on_some_path_is_never_failed(cuts: list[tuple[int, Path, bool, int]], loss: float,
                                                           seed: int) -> None:
    """Random cuts and heals of single paths over 6 hosts, and up to 20 % of the heartbeats lost at random
    (the seed replays it), where host 0 always keeps its mgmt path: it is never failed; and every host
    whose paths are all cut for over a second is failed within 1.2 s, unless multi-node failure mode is on."""
    site = Site(hosts(6), loss=loss, seed=seed)
    site.run(0.5)
    for host, path, cut, tenths in cuts:
        name = f"worker-{host}"
        if cut and not (host == 0 and path is Path.MGMT):
            site.cut.add((name, path))
        else:
            site.cut.discard((name, path))
        site.run(tenths / 10)
    assert site.failed_at("worker-0") is None
    site.run(1.2)
    for h in hosts(6):
        if all((h, p) in site.cut for p in Path):
            assert site.state(h) == "failed" or site.verdict.mnfa      # 3 hosts losing a network at once
