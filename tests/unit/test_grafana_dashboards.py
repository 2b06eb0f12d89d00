"""The generated Grafana dashboards (deploy/grafana/generate.py): the committed JSON is the generator's output
(THE DRIFT TEST: `python deploy/grafana/generate.py` rewrites them), each is a well-formed provisioned dashboard
on the provisioned datasource, and every metric an expression reads is one the services export.  Whether the
queries return data is tests/integration/test_dashboards_prometheus.py's question (a real Prometheus)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services.alarms.metrics
import services.alarms.webhooks.metrics
import services.core.metrics
import services.dcsync.metrics
import services.heartbeat.metrics
import services.inventory.bmc.redfish
import services.inventory.metrics
import services.orchestrator.metrics  # noqa: F401  (registers the metrics the dashboards read)
from services.alarms import service as alarms_service
from services.core import deadletters, system
from services.dcsync import service as dcsync_service
from services.heartbeat import service as heartbeat_service
from services.heartbeat.model import Path as HeartbeatPath
from services.inventory import service as inventory_service
from services.orchestrator import service as orchestrator_service

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "compose" / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("roost_grafana_generate", ROOT / "deploy/grafana/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def test_the_committed_dashboards_are_the_generators_output(generator: ModuleType) -> None:
    """THE DRIFT TEST: run `python deploy/grafana/generate.py` when it fails."""
    files = generator.build()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS.glob("*.json")}
    assert sorted(on_disk) == sorted(files), "run `python deploy/grafana/generate.py`"
    stale = [name for name, text in files.items() if on_disk[name] != text]
    assert not stale, f"{stale} out of date: run `python deploy/grafana/generate.py`"
    assert generator.main(["--check"]) == 0


def test_the_generator_writes_and_checks_a_directory(generator: ModuleType, tmp_path: Path) -> None:
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1
    (tmp_path / "roost-gone.json").write_text("{}")
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(generator.build())
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0


def test_the_dashboards_use_the_provisioned_datasource(generator: ModuleType) -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in provisioned if d["type"] == "prometheus"}
    assert generator.DATASOURCE_UID in uids
    for name, doc in committed().items():
        for p in panels(doc):
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": generator.DATASOURCE_UID}, (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], (name, p["title"])


def test_each_dashboard_is_well_formed() -> None:
    docs = committed()
    assert {d["uid"] for d in docs.values()} == {
        "roost-overview", "roost-services", "roost-bus", "roost-heartbeat", "roost-webhooks"}
    assert len({d["title"] for d in docs.values()}) == len(docs)
    for name, doc in docs.items():
        assert len(doc["uid"]) <= 40 and re.fullmatch(r"[a-z0-9-]+", doc["uid"]), name
        assert isinstance(doc["schemaVersion"], int) and doc["panels"], name
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        cells: set[tuple[int, int]] = set()
        for p in panels(doc):
            g = p["gridPos"]
            assert set(g) == {"h", "w", "x", "y"} and g["w"] > 0 and g["h"] > 0, (name, p["title"])
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, (name, p["title"], g)
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: {p['title']} overlaps another panel"
            cells |= mine
            if p["type"] == "row":
                continue
            assert p["title"] and p["targets"], name
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)) and all(refs), (name, p["title"])
            assert all(t["expr"].strip() for t in p["targets"]), (name, p["title"])
        titles = [p["title"] for p in panels(doc) if p["type"] != "row"]
        assert len(titles) == len(set(titles)), f"{name}: panel titles repeat"


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        base = family.name
        names.add(base)
        if family.type == "counter":
            names.add(base + "_total")
        elif family.type == "histogram":
            names |= {base + "_bucket", base + "_count", base + "_sum"}
        elif family.type == "info":
            names.add(base + "_info")
    return names


def test_every_metric_the_dashboards_read_is_one_the_services_export() -> None:
    exported = exported_names()
    read: set[str] = set()
    for doc in committed().values():
        for p in panels(doc):
            for t in p.get("targets", []):
                read |= set(re.findall(r"\broost_[a-z0-9_]+", t["expr"]))
    assert read, "no roost metric is read"
    assert read <= exported, f"metrics no service exports: {sorted(read - exported)}"


def test_the_service_groups_are_the_services_consumer_groups(generator: ModuleType) -> None:
    groups = {
        "core": [system.SYSTEM_GROUP, system.TOKEN_GROUP, deadletters.KEEPER_GROUP, deadletters.COMMAND_GROUP],
        "alarms": [alarms_service.GROUP],
        "inventory": [inventory_service.GROUP],
        "heartbeat": [heartbeat_service.GROUP, f"{heartbeat_service.GROUP}-controller-1"],
        "orchestrator": [orchestrator_service.GROUP],
        "dcsync": [dcsync_service.GROUP],
    }
    assert list(generator.SERVICE_GROUPS) == list(groups)
    for service, names in groups.items():
        for group in names:
            assert re.fullmatch(generator.SERVICE_GROUPS[service], group), (service, group)
            others = [s for s, pattern in generator.SERVICE_GROUPS.items()
                      if s != service and re.fullmatch(pattern, group)]
            assert not others, f"{group} matches {others} too"


def test_heartbeat_panels_cover_every_network(generator: ModuleType) -> None:
    assert tuple(p.network for p in HeartbeatPath) == generator.NETWORKS
