"""Prometheus metrics of the heartbeat monitor (conventions of ``services.core.metrics``).

Read from the monitor when Prometheus scrapes (a collector; the monitor's own counters are the source):

* ``roost_heartbeat_paths{network, state}``: monitored (host, network) paths by state;
* ``roost_heartbeat_hosts{state}``: monitored hosts by verdict (healthy / degraded / failed / unknown);
* ``roost_heartbeat_datagrams_sent_total{network}`` / ``..._received_total{network}``: requests sent and
  answers that passed every check;
* ``roost_heartbeat_datagrams_rejected_total{network, reason}``: dropped datagrams by ``DropReason``.

And ``roost_heartbeat_detection_seconds``: for each host declared failed, how long it had been silent on
every path then (the detection latency; the target is 1.1 s at the 100 ms period).

Labels are fixed sets; never host names.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.heartbeat.drops import DropReason
from services.heartbeat.model import Path
from services.heartbeat.paths import PathState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from services.heartbeat.monitor import HeartbeatMonitor
    from services.heartbeat.service import HeartbeatService

HOST_STATES: Final = ("healthy", "degraded", "failed", "unknown")

DETECTION = Histogram("roost_heartbeat_detection_seconds",
                      "Silence on every path of a host when the monitor declared it failed",
                      buckets=(0.5, 0.8, 0.9, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0))


class _MonitorCollector(Collector):
    def __init__(self) -> None:
        self._sources: list[Callable[[], HeartbeatMonitor | None]] = []
        self._lock = threading.Lock()

    def add(self, source: Callable[[], HeartbeatMonitor | None]) -> Callable[[], None]:
        with self._lock:
            self._sources.append(source)

        def remove() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)

        return remove

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily,
                             CounterMetricFamily]:
        return (GaugeMetricFamily("roost_heartbeat_paths", "Monitored heartbeat paths by state",
                                  labels=["network", "state"]),
                GaugeMetricFamily("roost_heartbeat_hosts", "Monitored hosts by heartbeat verdict", labels=["state"]),
                CounterMetricFamily("roost_heartbeat_datagrams_sent", "Heartbeat requests sent",
                                    labels=["network"]),
                CounterMetricFamily("roost_heartbeat_datagrams_received", "Heartbeat answers that passed "
                                    "authentication, freshness and replay checks", labels=["network"]),
                CounterMetricFamily("roost_heartbeat_datagrams_rejected", "Heartbeat datagrams dropped, by reason",
                                    labels=["network", "reason"]))

    def collect(self) -> Iterator[Metric]:
        paths_f, hosts_f, sent_f, received_f, rejected_f = self._families()
        paths: Counter[tuple[str, str]] = Counter()
        hosts: Counter[str] = Counter()
        sent: Counter[str] = Counter()
        received: Counter[str] = Counter()
        rejected: Counter[tuple[str, str]] = Counter()
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            monitor = source()
            if monitor is None:
                continue
            for hostname, host in list(monitor.hosts.items()):
                verdict = monitor.current(hostname)
                hosts[verdict.state if verdict is not None else "unknown"] += 1
                for path, health in host.health.items():
                    paths[(path.network, health.state.value)] += 1
            for path, endpoint in monitor.endpoints.items():
                sent[path.network] += endpoint.sent
                received[path.network] += endpoint.received
            for (path, reason), n in monitor.drop_counts().items():
                rejected[(path.network, reason.value)] += n
        for path in Path:
            for state in PathState:
                paths_f.add_metric([path.network, state.value], paths[(path.network, state.value)])
            sent_f.add_metric([path.network], sent[path.network])
            received_f.add_metric([path.network], received[path.network])
            for reason in DropReason:
                rejected_f.add_metric([path.network, reason.value], rejected[(path.network, reason.value)])
        for name in HOST_STATES:
            hosts_f.add_metric([name], hosts[name])
        yield from (paths_f, hosts_f, sent_f, received_f, rejected_f)


_collector = _MonitorCollector()
REGISTRY.register(_collector)


def register(service: HeartbeatService) -> Callable[[], None]:
    """Export ``service``'s monitor; returns the function that stops exporting it."""
    return _collector.add(lambda: service.monitor)
