"""Prometheus metrics of dcsync (conventions of ``services.core.metrics``).

* ``roost_dcsync_subclouds{availability, management}``: subclouds by state;
* ``roost_dcsync_sync_status{endpoint, status}``: subcloud endpoints by sync status;
* ``roost_dcsync_changes_applied_total{endpoint, lane}``: changes the subclouds applied;
* ``roost_dcsync_changes_failed_total{endpoint}``: changes a subcloud could not apply (a constraint);
* ``roost_dcsync_change_log_head{endpoint, lane}``: the last change captured at the controller;
* ``roost_dcsync_lag_changes{endpoint}``: how far the furthest-behind managed, online subcloud is;
* ``roost_dcsync_audits_total{endpoint, outcome}``: audits, ``clean`` / ``repaired`` / ``failed``;
* ``roost_dcsync_audit_seconds{endpoint}``: how long they took;
* ``roost_dcsync_repaired_rows_total{endpoint}``: rows audits had to upsert or delete;
* ``roost_dcsync_mass_silence``: 1 while many subclouds went silent at once (950.103).

Labels are fixed sets; never subcloud names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SUBCLOUDS = Gauge("roost_dcsync_subclouds", "Subclouds by availability and management",
                  ["availability", "management"])
SYNC_STATUS = Gauge("roost_dcsync_sync_status", "Subcloud endpoints by sync status", ["endpoint", "status"])
APPLIED = Counter("roost_dcsync_changes_applied_total", "Changes applied at subclouds", ["endpoint", "lane"])
FAILED = Counter("roost_dcsync_changes_failed_total", "Changes a subcloud could not apply", ["endpoint"])
HEAD = Gauge("roost_dcsync_change_log_head", "The last change captured at the controller", ["endpoint", "lane"])
LAG = Gauge("roost_dcsync_lag_changes", "Changes the furthest-behind online managed subcloud lacks", ["endpoint"])
AUDITS = Counter("roost_dcsync_audits_total", "Audits of subcloud endpoints", ["endpoint", "outcome"])
AUDIT_SECONDS = Histogram("roost_dcsync_audit_seconds", "Duration of an audit of one subcloud endpoint",
                          ["endpoint"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REPAIRED = Counter("roost_dcsync_repaired_rows_total", "Rows audits upserted or deleted", ["endpoint"])
MASS_SILENCE = Gauge("roost_dcsync_mass_silence", "1 while many subclouds went silent at once")
