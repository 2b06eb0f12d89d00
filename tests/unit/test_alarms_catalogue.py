"""The alarm catalogue: the real StarlingX events.yaml read completely, roost's own, and bad entries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.alarms.catalogue import (
    ROOST_CATALOGUE,
    AlarmError,
    AlarmType,
    Catalogue,
    CatalogueError,
    Context,
    DuplicateAlarmId,
    EventType,
    MalformedAlarmId,
    NotAnAlarm,
    Severity,
    Threshold,
    UnknownAlarmId,
    load_catalogues,
    normalise_alarm_id,
    roost_catalogue,
)

STARLINGX_EVENTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "starlingx-fault" / "events.yaml"
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])   # a loaded 2-core machine
ROOST_GROUP = "950"


@pytest.fixture(scope="module")
def events_path() -> Path:
    if not STARLINGX_EVENTS.is_file():
        pytest.fail(f"the StarlingX catalogue is missing: expected it at {STARLINGX_EVENTS.resolve()}")
    return STARLINGX_EVENTS


@pytest.fixture(scope="module")
def starlingx(events_path: Path) -> Catalogue:
    return Catalogue.load(events_path)


def _ids_as_written(path: Path) -> list[str]:
    return re.findall(r"^([0-9]+\.[0-9]+):", path.read_text(encoding="utf-8"), re.MULTILINE)


# -- the StarlingX catalogue ------------------------------------------------------------------------------


def test_every_starlingx_entry_loads(starlingx: Catalogue) -> None:
    assert len(starlingx) == 331
    assert len(list(starlingx.alarms())) == 135
    assert len(list(starlingx.logs())) == 196


def test_every_id_comes_back_as_written(starlingx: Catalogue, events_path: Path) -> None:
    written = _ids_as_written(events_path)
    assert len(written) == 331
    assert set(starlingx.ids) == set(written)
    assert "200.010" in starlingx.ids and "200.01" not in starlingx.ids
    # and the floats plain YAML gives normalise to the same text
    floats = yaml.safe_load(events_path.read_text(encoding="utf-8"))
    assert all(isinstance(k, float) for k in floats)
    assert sorted(normalise_alarm_id(k) for k in floats) == sorted(written)


def test_starlingx_definitions_are_typed(starlingx: Catalogue) -> None:
    locked = starlingx.alarm("200.001")
    assert locked.inhibit_alarms and not locked.suppression
    assert [d.id for d in starlingx.alarms() if d.inhibit_alarms] == ["200.001"]
    assert sum(d.suppression for d in starlingx.alarms()) == 73

    cpu = starlingx.alarm("100.101")
    assert cpu.severities == (Severity.CRITICAL, Severity.MAJOR)
    assert cpu.management_affecting_severity is Threshold.MAJOR
    assert cpu.mgmt_affecting(Severity.MAJOR) and cpu.mgmt_affecting(Severity.CRITICAL)
    assert cpu.degrade_affecting(Severity.CRITICAL) and not cpu.degrade_affecting(Severity.MAJOR)
    assert cpu.alarm_type is AlarmType.OPERATIONAL_VIOLATION
    assert cpu.probable_cause == "threshold-crossed"
    assert cpu.entity_instance_id.for_severity(Severity.MAJOR) == "host=<hostname>"
    assert cpu.context is Context.STARLINGX

    ntp = starlingx.alarm("100.114")       # description and entity template by severity
    assert ntp.entity_instance_id.for_severity(Severity.MAJOR) == "host=<hostname>.ntp"
    assert ntp.entity_instance_id.for_severity(Severity.MINOR) == "host=<hostname>.ntp=<IP address>"
    assert ntp.description.for_severity(Severity.MINOR) is not None

    sensor = starlingx.alarm("200.006")    # service affecting by severity
    assert sensor.service_affecting_for(Severity.CRITICAL) and not sensor.service_affecting_for(Severity.MINOR)

    bmc = starlingx.alarm("200.010")
    assert bmc.id == "200.010" and bmc.severities == (Severity.WARNING,)
    assert bmc.proposed_repair_action.for_severity(Severity.WARNING)

    log = starlingx.get("200.020")
    assert log.type is EventType.LOG and log.management_affecting_severity is Threshold.NONE


def test_counts_by_threshold_match_the_reference(starlingx: Catalogue) -> None:
    mgmt = [d.management_affecting_severity.value for d in starlingx.alarms()]
    assert {t: mgmt.count(t) for t in set(mgmt)} == {"warning": 88, "none": 36, "major": 8, "critical": 3}
    degrade = [d.degrade_affecting_severity.value for d in starlingx.alarms()]
    assert {t: degrade.count(t) for t in set(degrade)} == {"none": 110, "critical": 13, "major": 12}


def test_lookups_normalise_and_unknown_ids_are_refused(starlingx: Catalogue) -> None:
    assert starlingx.get(200.01).id == "200.010"
    assert starlingx.get("200.01").id == "200.010"
    assert 200.01 in starlingx and "999.999" not in starlingx and "nonsense" not in starlingx
    with pytest.raises(UnknownAlarmId, match=r"unknown alarm id '999\.999'") as info:
        starlingx.get("999.999")
    assert info.value.alarm_id == "999.999"
    assert isinstance(info.value, LookupError) and isinstance(info.value, AlarmError)
    with pytest.raises(MalformedAlarmId):
        starlingx.get("200-010")
    with pytest.raises(NotAnAlarm, match=r"200\.020 is a customer log"):
        starlingx.alarm("200.020")


# -- roost's own catalogue --------------------------------------------------------------------------------


def test_roost_catalogue_loads_and_merges_without_clashes(starlingx: Catalogue) -> None:
    roost = roost_catalogue()
    assert all(d.id.startswith(ROOST_GROUP + ".") for d in roost)
    assert not any(i.startswith(ROOST_GROUP + ".") for i in starlingx.ids), "StarlingX took roost's group"
    merged = Catalogue.merge(starlingx, roost)
    assert len(merged) == len(starlingx) + len(roost)
    assert merged.source_of("950.001").startswith(str(ROOST_CATALOGUE))
    both = load_catalogues(STARLINGX_EVENTS, ROOST_CATALOGUE)
    assert both.ids == merged.ids


def test_roost_catalogue_covers_what_the_services_raise() -> None:
    roost = roost_catalogue()
    for definition in roost.alarms():
        assert definition.context is Context.ROOST
        assert not definition.proposed_repair_action.empty, definition.id
        for severity in definition.severities:
            assert definition.description.for_severity(severity)
    locked = roost.alarm("950.001")
    assert locked.inhibit_alarms and not locked.suppression
    assert locked.severities == (Severity.WARNING,)
    failed = roost.alarm("950.002")
    assert failed.suppression and failed.degrade_affecting(Severity.CRITICAL)
    assert roost.alarm("950.003").entity_instance_id.for_severity(Severity.MAJOR) == (
        "host=<hostname>.network=<mgmt | cluster-host | oam>")
    wanted = {"950.001", "950.002", "950.003", "950.004", "950.005", "950.006", "950.007",
              "950.101", "950.102", "950.104", "950.201", "950.301"}
    assert wanted <= set(roost.ids)
    assert [d.id for d in roost.alarms() if d.inhibit_alarms] == ["950.001"]


def test_merge_refuses_a_duplicate_id(starlingx: Catalogue) -> None:
    with pytest.raises(DuplicateAlarmId, match=r"200\.010: defined twice \(also in .*events\.yaml:\d+\)"):
        Catalogue.merge(starlingx, Catalogue([starlingx.get("200.010")], source="mine.yaml"))


# -- malformed entries ----------------------------------------------------------------------------------

GOOD: dict[str, object] = {
    "Type": "Alarm", "Description": "it broke", "Entity_Instance_ID": "host=<hostname>",
    "Severity": ["major", "minor"], "Proposed_Repair_Action": "fix it", "Inhibit_Alarms": None,
    "Alarm_Type": "equipment", "Probable_Cause": "unknown", "Service_Affecting": False, "Suppression": True,
    "Management_Affecting_Severity": "major", "Degrade_Affecting_Severity": "none", "Context": "roost",
}


def _text(entries: dict[str, dict[str, object]]) -> str:
    return yaml.safe_dump(entries, sort_keys=False)


def test_a_good_entry_parses() -> None:
    catalogue = Catalogue.from_yaml(_text({"900.010": GOOD}), source="mine.yaml")
    assert catalogue.ids == ("900.010",)
    assert catalogue.alarm("900.010").severities == (Severity.MAJOR, Severity.MINOR)


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"Severity": "fatal"}, "Severity", "Input should be 'critical'"),
    ({"Severity": ["major", "major"]}, "Severity", "listed twice"),
    ({"Type": "Alert"}, "Type", "Input should be 'Alarm' or 'Log'"),
    ({"Alarm_Type": "bad"}, "Alarm_Type", "Input should be"),
    ({"Probable_Cause": "Not A Cause"}, "Probable_Cause", "should match pattern"),
    ({"Service_Affecting": "maybe"}, "Service_Affecting", "is not True or False"),
    ({"Suppression": 1}, "Suppression", "is not True or False"),
    ({"Management_Affecting_Severity": "high"}, "Management_Affecting_Severity", "Input should be"),
    ({"Description": {"fatal": "x"}}, "Description", "keys must be severities"),
    ({"Description": {"critical": "x"}}, "Description", "not among the entry's severities"),
    ({"Description": ""}, "Description", "must not be empty"),
    ({"Context": "mars"}, "Context", "Input should be"),
    ({"Colour": "red"}, "Colour", "unknown field"),
])
def test_a_malformed_entry_names_file_id_and_field(change: dict[str, object], field: str, message: str) -> None:
    entry = {**GOOD, **change}
    with pytest.raises(CatalogueError, match=re.escape(message)) as info:
        Catalogue.from_yaml(_text({"900.010": GOOD, "900.011": entry}), source="mine.yaml")
    err = info.value
    assert (err.source, err.alarm_id, err.field) == ("mine.yaml", "900.011", field)
    assert str(err).startswith(f"mine.yaml:{err.line}: 900.011: {field}: ")


def test_missing_fields_and_alarm_only_fields_on_a_log() -> None:
    entry = {k: v for k, v in GOOD.items() if k != "Probable_Cause"}
    with pytest.raises(CatalogueError, match="Probable_Cause: required field missing"):
        Catalogue.from_yaml(_text({"900.010": entry}), source="mine.yaml")
    log = {**GOOD, "Type": "Log"}
    with pytest.raises(CatalogueError, match="Proposed_Repair_Action: an alarm-only field on a Log"):
        Catalogue.from_yaml(_text({"900.010": log}), source="mine.yaml")


def test_bad_ids_and_duplicates_in_one_file() -> None:
    with pytest.raises(CatalogueError, match=r"mine\.yaml:1: 9000\.1: malformed alarm id"):
        Catalogue.from_yaml(_text({"9000.1": GOOD}), source="mine.yaml")
    with pytest.raises(CatalogueError, match=r"malformed alarm id"):
        Catalogue.from_yaml(_text({"900.0101": GOOD}), source="mine.yaml")
    text = _text({"900.010": GOOD}) + _text({"900.01": GOOD})   # the same id, as YAML would read it
    with pytest.raises(DuplicateAlarmId, match=r"900\.010: defined twice in this file \(first at line 1\)"):
        Catalogue.from_yaml(text, source="mine.yaml")


def test_not_a_catalogue() -> None:
    with pytest.raises(CatalogueError, match="top level must be a mapping"):
        Catalogue.from_yaml("- 1\n", source="mine.yaml")
    with pytest.raises(CatalogueError, match="not valid YAML"):
        Catalogue.from_yaml("a: [\n", source="mine.yaml")
    with pytest.raises(CatalogueError, match="expected a mapping of fields"):
        Catalogue.from_yaml("900.001: 3\n", source="mine.yaml")
    with pytest.raises(CatalogueError, match="cannot read the catalogue"):
        Catalogue.load("/nonexistent/events.yaml")
    assert len(Catalogue.from_yaml("", source="empty.yaml")) == 0


# -- ids ------------------------------------------------------------------------------------------------


@PROPERTY
@given(st.integers(0, 999), st.integers(0, 999))
def test_float_ids_normalise_back(group: int, event: int) -> None:
    text = f"{group:03d}.{event:03d}"
    assert normalise_alarm_id(float(text)) == text
    assert normalise_alarm_id(text) == text
    assert normalise_alarm_id(next(iter(yaml.safe_load(f"{text}: x")))) == text   # the float YAML reads


@pytest.mark.parametrize("value", ["", "abc", "1234.001", "100.1234", "-1.0", True, None, float("nan"), 100.0001])
def test_malformed_ids(value: object) -> None:
    with pytest.raises(MalformedAlarmId):
        normalise_alarm_id(value)


def test_int_and_short_ids() -> None:
    assert normalise_alarm_id(200) == "200.000"
    assert normalise_alarm_id("200.1") == "200.100"
    assert normalise_alarm_id(" 200.010 ") == "200.010"
