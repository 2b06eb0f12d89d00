#!/usr/bin/env python3
"""Generates roost's Grafana dashboards: ``python deploy/grafana/generate.py`` rewrites
``deploy/grafana/dashboards/*.json`` (``--check`` only says whether they are up to date).

Plain dicts to JSON, no dependencies: the dashboards are provisioned files (Grafana's file provider, see
``deploy/compose/grafana/provisioning/dashboards/roost.yml``) that use the provisioned datasource by its uid
(``deploy/compose/grafana/provisioning/datasources/prometheus.yml``).  Every expression reads only metrics the
services export (``services/*/metrics.py``, ``services/alarms/webhooks/metrics.py``,
``services/inventory/bmc/redfish.py``); tests/unit/test_grafana_dashboards.py checks the committed files
against this generator, and tests/integration/test_dashboards_prometheus.py asks a real Prometheus scraping
``roost up`` that every query returns data.

How the expressions aggregate:

* Database-wide gauges (hosts, active alarms, subclouds, webhook queue depth) are reported alike by every
  replica, and under ``roost up`` by every service's ``/metrics`` (one process, one registry): ``max by`` the
  metric's own labels first, then ``sum``.
* Counters and histograms are per process: ``sum by``.  Under ``roost up`` every service's ``/metrics``
  serves the same process's registry, so a Prometheus scraping all six endpoints counts each event six
  times; scrape one of them there (deploy/compose and deploy/k8s run a process per service).
* RED per service is read from the bus: a service's work is the deliveries its consumer groups handle
  (rate by outcome, the share that was retried or dead-lettered, handler latency).  The services export no
  HTTP request metrics, so their REST APIs have no RED panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

DATASOURCE_UID = "roost-prometheus"          # deploy/compose/grafana/provisioning/datasources/prometheus.yml
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 39                            # Grafana 11
RATE = "$__rate_interval"
TAGS = ["roost"]

# The consumer groups of each service, as a regular expression (the GROUP constants of services/*/service.py,
# core's in services/core/system.py and services/core/deadletters.py; a heartbeat monitor of a controller pair
# reads host events in a group of its own, heartbeat-<controller>); tests/unit/test_grafana_dashboards.py
# checks them against the code.
SERVICE_GROUPS: dict[str, str] = {
    "core": "core-system|core-token|core-dlq|dlq-keeper",
    "alarms": "alarms",
    "inventory": "inventory",
    "heartbeat": "heartbeat|heartbeat-.+",
    "orchestrator": "orchestrator",
    "dcsync": "dcsync",
}
# The heartbeat networks (services.heartbeat.model.Path).
NETWORKS = ("mgmt", "cluster-host", "oam")
QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))

Json = dict[str, Any]


# -- building blocks ----------------------------------------------------------------------------

def target(expr: str, legend: str = "") -> Json:
    t: Json = {"datasource": DATASOURCE, "expr": expr, "refId": ""}
    if legend:
        t["legendFormat"] = legend
    return t


def panel(title: str, targets: list[Json], *, unit: str = "short", kind: str = "timeseries", width: int = 12,
          height: int = 8, description: str = "", stack: bool = False) -> Json:
    p: Json = {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
    }
    if description:
        p["description"] = description
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 60, "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                        "orientation": "auto"}
    elif kind == "bargauge":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "displayMode": "basic", "orientation": "horizontal", "showUnfilled": True}
    return p


def quantiles(bucket: str, selector: str = "", by: str = "", legend: str = "") -> list[Json]:
    """p50/p95/p99 of a histogram, from its ``_bucket`` series."""
    group = f"{by}, le" if by else "le"
    return [target(f"histogram_quantile({q}, sum by ({group}) (rate({bucket}_bucket{{{selector}}}[{RATE}])))",
                   f"{legend}{name}" if not by else f"{legend}{name} {{{{{by}}}}}")
            for q, name in QUANTILES]


def dedup(metric: str, labels: str, selector: str = "") -> str:
    """A database-wide gauge every replica (and every endpoint of ``roost up``) reports alike: one value per
    label set."""
    return f"max by ({labels}) ({metric}{{{selector}}})" if selector else f"max by ({labels}) ({metric})"


def dashboard(uid: str, title: str, description: str, sections: list[tuple[str | None, list[Json]]]) -> Json:
    """Lays the panels out left to right on Grafana's 24-column grid, a row panel before each titled section."""
    panels: list[Json] = []
    y = 0
    next_id = 1
    for heading, members in sections:
        if heading is not None:
            panels.append({"type": "row", "title": heading, "id": next_id, "collapsed": False, "panels": [],
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            next_id += 1
            y += 1
        x = 0
        row_height = 0
        for p in members:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                y += row_height
                x = 0
                row_height = 0
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            p["id"] = next_id
            next_id += 1
            panels.append(p)
            x += w
            row_height = max(row_height, h)
        y += row_height
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": True, "title": "roost dashboards",
                   "includeVars": False, "keepTime": True}],
        "panels": panels,
    }


# -- the dashboards -----------------------------------------------------------------------------

HOST_LABELS = "personality, administrative, operational, availability"


def hosts_by(label: str) -> str:
    return f"sum by ({label}) ({dedup('roost_hosts', HOST_LABELS)})"


def overview() -> Json:
    stats = [
        panel("Hosts", [target(f"sum({dedup('roost_hosts', HOST_LABELS)})", "hosts")], kind="stat", width=4,
              height=4),
        panel("Hosts not available", [target(
            "sum(" + dedup("roost_hosts", HOST_LABELS, 'availability!="available"') + ")", "not available")],
            kind="stat", width=4, height=4),
        panel("Active alarms", [target(f"sum({dedup('roost_alarms_active', 'severity')})", "active")],
              kind="stat", width=4, height=4),
        panel("Critical and major alarms", [target(
            "sum(" + dedup("roost_alarms_active", "severity", 'severity=~"critical|major"') + ")", "critical+major")],
            kind="stat", width=4, height=4),
        panel("Subclouds", [target(f"sum({dedup('roost_dcsync_subclouds', 'availability, management')})",
                                   "subclouds")], kind="stat", width=4, height=4),
        panel("Subcloud endpoints out of sync", [target(
            "sum(" + dedup("roost_dcsync_sync_status", "endpoint, status", 'status="out-of-sync"') + ")",
            "out of sync")], kind="stat", width=4, height=4),
    ]
    hosts = [
        panel("Hosts by availability", [target(hosts_by("availability"), "{{availability}}")], stack=True,
              width=8),
        panel("Hosts by administrative and operational state",
              [target(hosts_by("administrative, operational"), "{{administrative}}/{{operational}}")],
              stack=True, width=8),
        panel("Hosts by personality", [target(hosts_by("personality"), "{{personality}}")], stack=True, width=8),
    ]
    alarms = [
        panel("Active alarms by severity", [target(dedup("roost_alarms_active", "severity"), "{{severity}}")],
              stack=True, description="Every replica of alarms reports the database-wide count: max, not sum."),
        panel("Dead letters waiting, by consumer group",
              [target(dedup("roost_dead_letters_waiting_messages", "group"), "{{group}}")],
              description="Messages no consumer could handle, kept for `roost dlq` (alarm 950.301 above the "
                          "threshold)."),
    ]
    subclouds = [
        panel("Subclouds by availability and management",
              [target(dedup("roost_dcsync_subclouds", "availability, management"),
                      "{{availability}}/{{management}}")], stack=True),
        panel("Subcloud endpoints in and out of sync",
              [target(dedup("roost_dcsync_sync_status", "endpoint, status"), "{{endpoint}} {{status}}")],
              stack=True),
    ]
    services = [
        panel("Services connected to the broker",
              [target("min by (service) (roost_broker_connected)", "{{service}}")], kind="bargauge", width=24,
              height=6, description="1 while the service's broker connection is up."),
    ]
    return dashboard("roost-overview", "roost / Overview",
                     "Hosts by state, active alarms by severity, subclouds in and out of sync.",
                     [(None, stats), ("Hosts", hosts), ("Alarms", alarms), ("Subclouds", subclouds),
                      ("Services", services)])


def group_selector(service: str) -> str:
    groups = SERVICE_GROUPS[service]
    return f'group=~"{groups}"' if "|" in groups or "." in groups else f'group="{groups}"'


def red(service: str) -> list[Json]:
    sel = group_selector(service)
    handled = f"roost_bus_messages_consumed_total{{{sel}}}"
    failed = f'roost_bus_messages_consumed_total{{{sel}, outcome=~"retry|dead_letter"}}'
    return [
        panel(f"{service}: messages handled by outcome",
              [target(f"sum by (outcome) (rate({handled}[{RATE}]))", "{{outcome}}")], unit="ops", width=8,
              stack=True, description="Deliveries settled by the service's consumer groups: ack, rejected (a "
                                      "command refused with a reason), duplicate, retry, dead_letter."),
        panel(f"{service}: failed share", [target(
            f"(sum(rate({failed}[{RATE}])) or vector(0)) / sum(rate({handled}[{RATE}]))", "retried or dead-lettered")],
            unit="percentunit", width=8,
            description="Deliveries retried or dead-lettered, of all the service handled (0 when none failed)."),
        panel(f"{service}: handler latency", quantiles("roost_bus_handler_duration_seconds", sel), unit="s",
              width=8, description="Delivery to settlement, handler included."),
    ]


def services() -> Json:
    work: dict[str, list[Json]] = {
        "alarms": [
            panel("alarms: alarm changes", [
                target(f"sum by (change) (rate(roost_alarm_sets_total[{RATE}]))", "{{change}}"),
                target(f"sum by (cause) (rate(roost_alarm_clears_total[{RATE}]))", "cleared: {{cause}}"),
                target(f"sum(rate(roost_alarm_logs_total[{RATE}]))", "customer logs"),
            ], unit="ops", width=24),
        ],
        "inventory": [
            panel("inventory: host commands by outcome",
                  [target(f"sum by (command, outcome) (rate(roost_host_commands_total[{RATE}]))",
                          "{{command}} {{outcome}}")], unit="ops", width=8),
            panel("inventory: BMC call latency", quantiles("roost_bmc_request_seconds", by="operation"), unit="s",
                  width=8, description="One BMC call (one or a few Redfish requests), by operation."),
            panel("inventory: BMC failures",
                  [target(f"sum by (operation, kind) (rate(roost_bmc_failures_total[{RATE}]))",
                          "{{operation}} {{kind}}")], unit="ops", width=8),
        ],
        "orchestrator": [
            panel("orchestrator: host-services commands by outcome",
                  [target(f"sum by (action, outcome) (rate(roost_orchestrator_drains_total[{RATE}]))",
                          "{{action}} {{outcome}}")], unit="ops", width=8,
                  description="Cordon, drain and taint on lock; untaint and uncordon on unlock."),
            panel("orchestrator: drain duration", quantiles("roost_orchestrator_drain_seconds", by="action"),
                  unit="s", width=8),
            panel("orchestrator: evictions by answer",
                  [target(f"sum by (outcome) (rate(roost_orchestrator_evictions_total[{RATE}]))", "{{outcome}}")],
                  unit="ops", width=8, description="refused: a PodDisruptionBudget said not now (429)."),
            panel("orchestrator: update strategy state",
                  [target("max by (state) (roost_orchestrator_strategy_state)", "{{state}}")], width=12),
            panel("orchestrator: strategy step duration",
                  quantiles("roost_orchestrator_strategy_step_seconds", by="step"), unit="s", width=12),
        ],
        "dcsync": [
            panel("dcsync: changes applied at subclouds",
                  [target(f"sum by (endpoint, lane) (rate(roost_dcsync_changes_applied_total[{RATE}]))",
                          "{{endpoint}} {{lane}}")], unit="ops", width=8),
            panel("dcsync: sync lag", [target(dedup("roost_dcsync_lag_changes", "endpoint"), "{{endpoint}}")],
                  width=8, description="Changes the furthest-behind online managed subcloud lacks."),
            panel("dcsync: audits by outcome",
                  [target(f"sum by (endpoint, outcome) (rate(roost_dcsync_audits_total[{RATE}]))",
                          "{{endpoint}} {{outcome}}")], unit="ops", width=8),
            panel("dcsync: audit duration", quantiles("roost_dcsync_audit_seconds", by="endpoint"), unit="s",
                  width=12),
            panel("dcsync: rows repaired by audits",
                  [target(f"sum by (endpoint) (rate(roost_dcsync_repaired_rows_total[{RATE}]))", "{{endpoint}}")],
                  unit="ops", width=12),
        ],
    }
    sections: list[tuple[str | None, list[Json]]] = [
        (service, red(service) + work.get(service, [])) for service in SERVICE_GROUPS]
    return dashboard("roost-services", "roost / Services (RED)",
                     "Rate, errors and duration of each service's work: the bus deliveries its consumer groups "
                     "handle, and its own operations. (No HTTP request metrics are exported.)",
                     sections)


def bus() -> Json:
    publish = [
        panel("Published by broker confirmation",
              [target(f"sum by (outcome) (rate(roost_bus_messages_published_total[{RATE}]))", "{{outcome}}")],
              unit="ops", width=8, stack=True),
        panel("Published by type (top 10)",
              [target(f"topk(10, sum by (type) (rate(roost_bus_messages_published_total[{RATE}])))", "{{type}}")],
              unit="ops", width=8),
        panel("Publish confirmation latency", quantiles("roost_bus_publish_duration_seconds"), unit="s", width=8),
    ]
    consume = [
        panel("Handled by consumer group",
              [target(f"sum by (group) (rate(roost_bus_messages_consumed_total[{RATE}]))", "{{group}}")],
              unit="ops", width=8, stack=True),
        panel("Handler latency p95 by consumer group", [target(
            f"histogram_quantile(0.95, sum by (group, le) (rate(roost_bus_handler_duration_seconds_bucket[{RATE}])))",
            "{{group}}")], unit="s", width=8),
        panel("Dead-lettered by consumer group",
              [target(f"sum by (group) (rate(roost_bus_messages_dead_lettered_total[{RATE}]))", "{{group}}")],
              unit="ops", width=8),
    ]
    outbox = [
        panel("Outbox rows waiting for the broker",
              [target(dedup("roost_outbox_pending_messages", "schema"), "{{schema}}")], width=8,
              description="Rows written in a service's transaction and not yet confirmed by the broker."),
        panel("Outbox lag: age of the oldest waiting row",
              [target(dedup("roost_outbox_oldest_pending_age_seconds", "schema"), "{{schema}}")], unit="s",
              width=8, description="Grows while a relay is stuck (broker down, relay dead)."),
        panel("Dead letters waiting", [target(dedup("roost_dead_letters_waiting_messages", "group"), "{{group}}")],
              width=8),
    ]
    broker = [
        panel("Broker connection by service",
              [target("min by (service, broker) (roost_broker_connected)", "{{service}} ({{broker}})")],
              width=12),
        panel("Broker reconnects by service",
              [target(f"sum by (service) (increase(roost_broker_reconnects_total[{RATE}]))", "{{service}}")],
              width=12),
    ]
    return dashboard("roost-bus", "roost / Bus and outbox",
                     "Publishing, consumption, dead letters, outbox lag and broker connections.",
                     [("Publishing", publish), ("Consuming", consume), ("Outbox lag and dead letters", outbox),
                      ("Broker connections", broker)])


def heartbeat() -> Json:
    per_path = [
        panel(f"{network}: paths by state",
              [target(dedup("roost_heartbeat_paths", "state", f'network="{network}"'), "{{state}}")],
              stack=True, width=8, description=f"Monitored (host, {network}) heartbeat paths by health.")
        for network in NETWORKS]
    traffic = [
        panel("Hosts by heartbeat verdict", [target(dedup("roost_heartbeat_hosts", "state"), "{{state}}")],
              stack=True, width=8),
        panel("Answer ratio by network", [target(
            f"sum by (network) (rate(roost_heartbeat_datagrams_received_total[{RATE}])) / "
            f"sum by (network) (rate(roost_heartbeat_datagrams_sent_total[{RATE}]))", "{{network}}")],
            unit="percentunit", width=8,
            description="Authentic, fresh answers per request sent: below 1 on a path that loses datagrams."),
        panel("Requests sent by network",
              [target(f"sum by (network) (rate(roost_heartbeat_datagrams_sent_total[{RATE}]))", "{{network}}")],
              unit="pps", width=8),
        panel("Rejected datagrams by network and reason", [target(
            f"sum by (network, reason) (rate(roost_heartbeat_datagrams_rejected_total[{RATE}]))",
            "{{network}} {{reason}}")], unit="pps", width=12,
            description="Forged, replayed, stale or malformed datagrams the monitor dropped."),
        panel("Failure detection latency", quantiles("roost_heartbeat_detection_seconds"), unit="s", width=12,
              description="Silence on every path of a host when it was declared failed (target: 1.1 s at the "
                          "100 ms period)."),
    ]
    return dashboard("roost-heartbeat", "roost / Heartbeat",
                     "Heartbeat health per network path, host verdicts, datagrams, failure detection.",
                     [("Paths", per_path), ("Hosts and datagrams", traffic)])


def webhooks() -> Json:
    return dashboard("roost-webhooks", "roost / Webhook delivery",
                     "Signed alarm notifications to subscribers: attempts by outcome, latency, queue depth.", [
        (None, [
            panel("Delivery attempts by outcome",
                  [target(f"sum by (outcome) (rate(roost_webhook_deliveries_total[{RATE}]))", "{{outcome}}")],
                  unit="ops", width=8, stack=True,
                  description="delivered (2xx), retry (network error, timeout, 5xx, 429, 408), dead_letter."),
            panel("Delivered share of attempts", [target(
                f'sum(rate(roost_webhook_deliveries_total{{outcome="delivered"}}[{RATE}])) / '
                f"sum(rate(roost_webhook_deliveries_total[{RATE}]))", "delivered")], unit="percentunit", width=8),
            panel("Queue depth by subscription",
                  [target(dedup("roost_webhook_queue_depth_messages", "subscription"), "{{subscription}}")],
                  width=8, description="Deliveries waiting per subscription id (pending rows and matching "
                                       "notifications not fanned out yet)."),
            panel("Enqueue to 2xx latency", quantiles("roost_webhook_delivery_latency_seconds"), unit="s",
                  width=12, description="From the alarm change's commit to the subscriber's 2xx."),
            panel("HTTP attempt duration", quantiles("roost_webhook_delivery_duration_seconds"), unit="s",
                  width=12),
        ]),
    ])


DASHBOARDS = {"overview": overview, "services": services, "bus": bus, "heartbeat": heartbeat,
              "webhooks": webhooks}


def render(doc: Json) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def build() -> dict[str, str]:
    """File name -> content of every dashboard."""
    return {f"roost-{name}.json": render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the committed files are current")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    files = build()
    stale = sorted(name for name, text in files.items()
                   if not (args.out / name).is_file() or (args.out / name).read_text(encoding="utf-8") != text)
    extra = sorted(p.name for p in args.out.glob("roost-*.json") if p.name not in files)
    if args.check:
        for name in stale:
            print(f"{args.out / name} is out of date", file=sys.stderr)
        for name in extra:
            print(f"{args.out / name} is not generated any more", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out / name).write_text(files[name], encoding="utf-8")
    for name in extra:
        (args.out / name).unlink()
    print(f"{len(files)} dashboards in {args.out} ({len(stale)} written, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
