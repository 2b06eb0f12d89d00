"""The contract: the envelope, the registry, core's messages and the committed AsyncAPI document."""

from __future__ import annotations

import importlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import schemas.catalog
from schemas import asyncapi
from schemas.catalog import load
from schemas.core import (
    REASON_MAX,
    DeadLettersHigh,
    DeadLetterSummary,
    DlqList,
    DlqPurge,
    DlqReplay,
    Ping,
    Pong,
    ServiceStarted,
)
from schemas.envelope import REPLY_TYPE, CommandReply, EntityEvent, Envelope, Principal, ReplyStatus, Role
from schemas.registry import (
    REGISTRY,
    InvalidMessage,
    MessageKind,
    MessageSpec,
    Registry,
    UnknownMessageType,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class HostLocked(EntityEvent):
    """Test model: an entity event."""

    personality: str = Field(min_length=1)


class HostLockedV2(EntityEvent):
    """Test model: a newer version of the same event."""

    personality: str
    forced: bool = False


class LockHost(BaseModel):
    """Test model: a command."""

    model_config = ConfigDict(extra="forbid")

    hostname: str = Field(min_length=1, max_length=64)
    force: bool = False


def copy_registry(source: Registry) -> Registry:
    copied = Registry()
    for spec in source:
        copied.register(spec)
    return copied


# -- envelope --------------------------------------------------------------------------------------


def test_envelope_round_trips_through_json() -> None:
    principal = Principal(name="ops", role=Role.ADMIN)
    env = Envelope.command("roost.cmd.host.lock", LockHost(hostname="compute-0"), source="roost/cli",
                           subject="host/compute-0", principal=principal, idempotencykey="k-1")
    again = Envelope.model_validate_json(env.model_dump_json())
    assert again == env
    assert again.principal == principal
    assert again.data == {"hostname": "compute-0", "force": False}


def test_envelope_carries_the_cloudevents_and_extension_attributes() -> None:
    env = Envelope.command("roost.cmd.host.lock", {"hostname": "h"}, source="roost/cli",
                           principal=Principal(name="ops", role=Role.ADMIN), idempotencykey="k-1")
    wire = json.loads(env.model_dump_json())
    for attribute in ("id", "source", "type", "specversion", "time", "subject", "datacontenttype"):
        assert attribute in wire
    for extension in ("correlationid", "causationid", "principal", "deadline", "idempotencykey", "dataversion"):
        assert extension in wire
        assert re.fullmatch(r"[a-z0-9]+", extension), "CloudEvents extension names are lower-case alphanumerics"
    assert wire["specversion"] == "1.0"
    assert wire["datacontenttype"] == "application/json"
    assert wire["dataversion"] == 1
    assert wire["idempotencykey"] == "k-1"
    assert wire["principal"] == {"name": "ops", "role": "admin", "kind": "user"}


@pytest.mark.parametrize("field", ["time", "deadline"])
def test_naive_timestamps_are_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Envelope(type="roost.host.locked", source="roost/inventory", **{field: datetime(2025, 1, 1, 12, 0)})


@pytest.mark.parametrize("name", [
    "host.locked", "roost", "roost.", "roost..host", "roost.Host.locked", "roost.host-locked",
    "roost.host.1locked", "roost.host.locked ", "Roost.host", "roost.host.>", "roost.*.locked",
])
def test_bad_type_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="type"):
        Envelope(type=name, source="roost/inventory")


def test_unknown_envelope_attributes_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Envelope.model_validate({"type": "roost.host.locked", "source": "s", "colour": "red"})


def test_command_deadline_and_expiry() -> None:
    env = Envelope.command("roost.cmd.host.lock", {}, source="roost/cli", timeout=5.0)
    assert env.deadline is not None and env.idempotencykey
    assert not env.expired()
    assert not env.expired(now=env.deadline)
    assert env.expired(now=env.deadline + timedelta(microseconds=1))
    event = Envelope(type="roost.host.locked", source="roost/inventory")
    assert not event.expired(now=datetime.max.replace(tzinfo=UTC)), "without a deadline nothing expires"
    assert env.is_command and not event.is_command


def test_commands_get_a_fresh_idempotency_key_unless_given() -> None:
    a = Envelope.command("roost.cmd.host.lock", {}, source="roost/cli")
    b = Envelope.command("roost.cmd.host.lock", {}, source="roost/cli")
    assert a.idempotencykey != b.idempotencykey
    assert Envelope.command("roost.cmd.host.lock", {}, source="c", idempotencykey="same").idempotencykey == "same"


def test_caused_keeps_the_correlation_id_and_sets_the_causation_id() -> None:
    principal = Principal(name="ops", role=Role.ADMIN)
    command = Envelope.command("roost.cmd.host.lock", {"hostname": "h"}, source="roost/cli", principal=principal)
    event = command.caused("roost.host.locked", HostLocked(entity_id="h", version=3, personality="worker"),
                           source="roost/inventory", subject="host/h")
    assert event.correlationid == command.correlationid
    assert event.causationid == command.id
    assert event.id != command.id
    assert event.principal == principal
    assert event.data == {"entity_id": "h", "version": 3, "personality": "worker"}
    assert event.subject == "host/h" and event.source == "roost/inventory"
    further = event.caused("roost.alarm.raised", {}, source="roost/alarms")
    assert further.correlationid == command.correlationid and further.causationid == event.id


def test_role_order() -> None:
    assert Role.ADMIN.allows(Role.READER) and Role.ADMIN.allows(Role.ADMIN)
    assert Role.READER.allows(Role.READER) and not Role.READER.allows(Role.ADMIN)


# -- registry --------------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.event("roost.host.locked", "inventory", HostLocked, "A host was locked")
    reg.event("roost.host.locked", "inventory", HostLockedV2, "A host was locked", version=2)
    reg.command("roost.cmd.host.lock", "orchestrator", LockHost, "Lock a host", min_role=Role.ADMIN)
    return reg


def test_duplicate_registration_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"roost.host.locked v1 is already registered by inventory"):
        registry.event("roost.host.locked", "inventory", HostLocked, "again")


def test_a_type_has_one_owner(registry: Registry) -> None:
    with pytest.raises(ValueError, match="owned by inventory, not heartbeat"):
        registry.event("roost.host.locked", "heartbeat", HostLocked, "a new version by someone else", version=3)


def test_unknown_owner_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="unknown owner"):
        registry.event("roost.host.painted", "paint-shop", HostLocked, "no")


@pytest.mark.parametrize("name", ["roost.Host", "host.locked", "roost"])
def test_bad_names_are_refused_by_the_registry(registry: Registry, name: str) -> None:
    with pytest.raises(ValueError, match="bad message type name"):
        registry.event(name, "inventory", HostLocked, "no")


def test_commands_and_only_commands_are_named_roost_cmd(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"roost.cmd"):
        registry.command("roost.host.lock", "orchestrator", LockHost, "a command outside roost.cmd.*")
    with pytest.raises(ValueError, match=r"roost.cmd"):
        registry.event("roost.cmd.host.locked", "inventory", HostLocked, "an event inside roost.cmd.*")
    with pytest.raises(ValueError, match=r"roost.cmd"):
        registry.register(MessageSpec("roost.cmd.x", MessageKind.EVENT, "core", Ping, "kind disagrees"))


def test_unknown_type_error_says_what_is_unknown(registry: Registry) -> None:
    with pytest.raises(UnknownMessageType, match=r"unknown message type 'roost.host.painted'"):
        registry.get("roost.host.painted")
    with pytest.raises(UnknownMessageType, match=r"roost.host.locked has no version 7 \(known: 1, 2\)"):
        registry.get("roost.host.locked", 7)


def test_versions_are_looked_up_separately(registry: Registry) -> None:
    assert registry.get("roost.host.locked").model is HostLocked
    assert registry.get("roost.host.locked", 2).model is HostLockedV2
    assert "roost.host.locked" in registry and "roost.host.painted" not in registry
    assert len(registry) == 3
    assert [(s.type, s.version) for s in registry] == [
        ("roost.cmd.host.lock", 1), ("roost.host.locked", 1), ("roost.host.locked", 2)]
    assert registry.get("roost.host.locked").entity_event
    assert not registry.get("roost.cmd.host.lock").entity_event


def test_validate_uses_the_version_the_envelope_names(registry: Registry) -> None:
    v2 = Envelope(type="roost.host.locked", source="s", dataversion=2,
                  data={"entity_id": "h", "version": 1, "personality": "worker", "forced": True})
    assert registry.validate(v2) == HostLockedV2(entity_id="h", version=1, personality="worker", forced=True)
    with pytest.raises(InvalidMessage, match="forced"):
        registry.validate(v2.model_copy(update={"dataversion": 1}))


def test_validate_reports_every_field_error(registry: Registry) -> None:
    env = Envelope(type="roost.host.locked", source="s", data={"entity_id": "", "version": 0})
    with pytest.raises(InvalidMessage) as caught:
        registry.validate(env)
    message = str(caught.value)
    assert message.startswith("roost.host.locked v1: ")
    assert "entity_id: String should have at least 1 character" in message
    assert "version: Input should be greater than or equal to 1" in message
    assert "personality: Field required" in message


def test_validate_cuts_a_long_error_list(registry: Registry) -> None:
    class Wide(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int
        f: int
        g: int

    registry.event("roost.test.wide", "core", Wide, "seven required fields")
    with pytest.raises(InvalidMessage, match=r"\(\+2 more\)$"):
        registry.validate(Envelope(type="roost.test.wide", source="s"))


def test_envelope_checks_data_at_the_producer(registry: Registry) -> None:
    env = registry.envelope("roost.cmd.host.lock", LockHost(hostname="h"), source="roost/cli")
    assert env.data == {"hostname": "h", "force": False}
    with pytest.raises(ValidationError):
        registry.envelope("roost.cmd.host.lock", {"hostname": ""}, source="roost/cli")
    with pytest.raises(UnknownMessageType):
        registry.envelope("roost.cmd.host.paint", {}, source="roost/cli")


# -- core messages ---------------------------------------------------------------------------------


def test_catalog_registers_core_once() -> None:
    first = load()
    count = len(first)
    assert first is REGISTRY
    importlib.import_module("schemas.core")
    importlib.reload(schemas.catalog)
    assert schemas.catalog.load() is REGISTRY
    assert len(REGISTRY) == count
    for name in ("roost.cmd.system.ping", "roost.cmd.dlq.list", "roost.cmd.dlq.show", "roost.cmd.dlq.replay",
                 "roost.cmd.dlq.purge", "roost.system.dead_letters_high", "roost.system.dead_letters_normal",
                 "roost.system.service_started", "roost.system.service_stopping"):
        assert name in REGISTRY
        assert REGISTRY.get(name).owner == "core"


@pytest.mark.parametrize(("name", "role"), [
    ("roost.cmd.system.ping", Role.READER), ("roost.cmd.dlq.list", Role.READER), ("roost.cmd.dlq.show", Role.READER),
    ("roost.cmd.dlq.replay", Role.ADMIN), ("roost.cmd.dlq.purge", Role.ADMIN),
])
def test_core_commands_roles_and_results(name: str, role: Role) -> None:
    spec = load().get(name)
    assert spec.kind is MessageKind.COMMAND
    assert spec.min_role is role
    assert spec.result_model is not None


def test_ping_and_pong() -> None:
    assert Ping().model_dump() == {}
    with pytest.raises(ValidationError, match="extra"):
        Ping.model_validate({"hello": 1})
    pong = Pong(service="inventory", version="0.1.0", time=NOW)
    assert Pong.model_validate_json(pong.model_dump_json()) == pong
    with pytest.raises(ValidationError, match="timezone"):
        Pong(service="inventory", version="0.1.0", time=datetime(2025, 1, 1))
    with pytest.raises(ValidationError, match="service"):
        Pong(service="Inventory Service", version="0.1.0", time=NOW)


@pytest.mark.parametrize("data", [{"ids": ["1", "2"]}, {"group": "inventory-hosts"}, {"all": True},
                                  {"ids": [], "group": "g", "all": False}])
@pytest.mark.parametrize("model", [DlqReplay, DlqPurge])
def test_dlq_selection_accepts_exactly_one(model: type[BaseModel], data: dict[str, Any]) -> None:
    model.model_validate(data)


@pytest.mark.parametrize(("data", "detail"), [
    ({}, "none was given"),
    ({"ids": [], "all": False}, "none was given"),
    ({"ids": ["1"], "group": "g"}, "got ids and group"),
    ({"group": "g", "all": True}, "got group and all"),
    ({"ids": ["1"], "group": "g", "all": True}, "got ids and group and all"),
])
@pytest.mark.parametrize("model", [DlqReplay, DlqPurge])
def test_dlq_selection_refuses_none_or_several(model: type[BaseModel], data: dict[str, Any], detail: str) -> None:
    with pytest.raises(ValidationError, match=rf"exactly one of ids, group or all \({detail}\)"):
        model.model_validate(data)


def test_dlq_selection_errors_reach_the_sender_through_the_registry() -> None:
    env = Envelope.command("roost.cmd.dlq.replay", {}, source="roost/cli")
    with pytest.raises(InvalidMessage, match=r"roost.cmd.dlq.replay v1: .*exactly one of ids, group or all"):
        load().validate(env)
    with pytest.raises(InvalidMessage, match=r"ids\.0"):
        load().validate(env.model_copy(update={"data": {"ids": [""]}}))


def test_dlq_list_bounds() -> None:
    assert DlqList().limit == 50 and DlqList().group is None
    DlqList(limit=1)
    DlqList(limit=1000)
    for bad in (0, 1001, -5):
        with pytest.raises(ValidationError, match="limit"):
            DlqList(limit=bad)
    with pytest.raises(ValidationError):
        DlqList(group="")


def test_dead_letter_reason_is_cut_not_refused() -> None:
    summary = DeadLetterSummary(id="1", group="g", subject="roost.host.locked", type=None, reason="x" * 10_000,
                                attempts=5, dead_lettered_at=NOW)
    assert len(summary.reason) == REASON_MAX and summary.reason.endswith("…")


def test_dead_letter_depth_events() -> None:
    DeadLettersHigh(depth=120, threshold=100, groups={"inventory-hosts": 120})
    with pytest.raises(ValidationError):
        DeadLettersHigh(depth=-1, threshold=100)
    with pytest.raises(ValidationError):
        DeadLettersHigh(depth=1, threshold=1, groups={"g": -1})
    with pytest.raises(ValidationError):
        ServiceStarted(service="inventory", version="0.1.0", instance="")


# -- the AsyncAPI document -------------------------------------------------------------------------


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references: {ref}"
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"{ref} does not resolve (at {token!r})"
        node = node[token]
    if isinstance(node, dict) and set(node) == {"$ref"}:  # a reference to a reference: follow it
        return resolve(document, node["$ref"])
    return node


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = [(path, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(walk(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(walk(value, f"{path}/{i}"))
    return found


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi.build_document(load())


def test_the_committed_document_matches_the_models(document: dict[str, Any]) -> None:
    """THE DRIFT TEST: regenerate with `python -m schemas.asyncapi --write` when it fails."""
    differences = asyncapi.check(asyncapi.DOCUMENT_PATH, document)
    assert not differences, (
        "schemas/asyncapi.json is out of date with the models; run `python -m schemas.asyncapi --write`:\n"
        + "\n".join(differences[:40]))


def test_the_drift_test_sees_a_new_message(tmp_path: Path) -> None:
    path = tmp_path / "asyncapi.json"
    path.write_text(asyncapi.render(asyncapi.build_document(load())), encoding="utf-8")
    assert asyncapi.check(path, asyncapi.build_document(load())) == []

    mutated = copy_registry(load())
    mutated.event("roost.test.extra", "core", HostLocked, "a message the committed document lacks")
    differences = asyncapi.check(path, asyncapi.build_document(mutated))
    assert "+ /channels/roost.test.extra: added" in differences
    assert "+ /components/messages/roost.test.extra.v1: added" in differences
    assert "+ /operations/roost.test.extra.v1.send: added" in differences
    assert "+ /components/schemas/HostLocked: added" in differences


def test_the_drift_test_sees_a_changed_model(tmp_path: Path) -> None:
    path = tmp_path / "asyncapi.json"
    path.write_text(asyncapi.render(asyncapi.build_document(load())), encoding="utf-8")

    class DlqList(BaseModel):  # same name, one more field, a different bound
        model_config = ConfigDict(extra="forbid")

        group: str | None = None
        limit: int = Field(default=50, ge=1, le=500)
        newest_first: bool = False

    mutated = Registry()
    for spec in load():
        if spec.type == "roost.cmd.dlq.list":
            spec = MessageSpec(spec.type, spec.kind, spec.owner, DlqList, spec.summary, spec.version,
                               spec.min_role, spec.result_model)
        mutated.register(spec)
    differences = asyncapi.check(path, asyncapi.build_document(mutated))
    assert "+ /components/schemas/DlqList/properties/newest_first: added" in differences
    assert "~ /components/schemas/DlqList/properties/limit/maximum: 1000 -> 500" in differences


def test_check_reports_missing_broken_and_reformatted_files(tmp_path: Path, document: dict[str, Any]) -> None:
    missing = tmp_path / "missing.json"
    assert asyncapi.check(missing, document) == [f"{missing} does not exist"]
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    assert "is not valid JSON" in asyncapi.check(broken, document)[0]
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(document), encoding="utf-8")
    assert asyncapi.check(compact, document) == ["same content, different formatting"]


def test_cli_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "asyncapi.json"
    assert asyncapi.main(["--check", "--path", str(path)]) == 1
    assert "regenerate it with: python -m schemas.asyncapi --write" in capsys.readouterr().err
    assert asyncapi.main(["--write", "--path", str(path)]) == 0
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert asyncapi.main(["--check", "--path", str(path)]) == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    data["info"]["version"] = "9.9.9"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert asyncapi.main(["--check", "--path", str(path)]) == 1
    err = capsys.readouterr().err
    assert "out of date with the models (1 difference" in err
    assert '~ /info/version: "9.9.9" -> ' in err


def test_the_document_is_deterministic() -> None:
    specs = list(load())
    reversed_registry = Registry()
    for spec in reversed(specs):
        reversed_registry.register(spec)
    first = asyncapi.render(asyncapi.build_document(load(), version="1.0.0"))
    assert asyncapi.render(asyncapi.build_document(load(), version="1.0.0")) == first
    assert asyncapi.render(asyncapi.build_document(reversed_registry, version="1.0.0")) == first


def test_document_is_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "roost"
    assert document["info"]["version"] == asyncapi.package_version()
    assert {name: server["protocol"] for name, server in document["servers"].items()} == {
        "nats": "nats", "amqp": "amqp"}
    assert all(server["description"] and server["host"] for server in document["servers"].values())
    assert set(document) <= {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
                             "components"}


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = [(path, node["$ref"]) for path, node in walk(document) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 50
    for _path, ref in refs:
        resolve(document, ref)
    assert not [path for path, node in walk(document) if isinstance(node, dict) and "$defs" in node], \
        "nested definitions are lifted into components.schemas"


def test_component_names_are_valid_asyncapi_keys(document: dict[str, Any]) -> None:
    for section in document["components"].values():
        for key in section:
            assert re.fullmatch(r"[a-zA-Z0-9.\-_]+", key), key


def test_channels_are_the_registered_types_plus_the_reply_channel(document: dict[str, Any]) -> None:
    registry = load()
    for key, channel in document["channels"].items():
        if key == asyncapi.REPLY_CHANNEL:
            assert channel["address"] is None
            continue
        assert channel["address"] == key
        assert key in registry, f"channel {key} is not a registered type"
        for name, ref in channel["messages"].items():
            message = resolve(document, ref["$ref"])
            assert message["name"] == name
            assert message["payload"]["properties"]["type"]["const"] == key
    assert {s.type for s in registry} == set(document["channels"]) - {asyncapi.REPLY_CHANNEL}


def test_every_registered_message_is_described(document: dict[str, Any]) -> None:
    registry = load()
    schemas_ = document["components"]["schemas"]
    for required in ("Envelope", "CommandReply", "Principal", "EventHeaders", "CommandHeaders"):
        assert required in schemas_
    for spec in registry:
        name = f"{spec.type}.v{spec.version}"
        message = document["components"]["messages"][name]
        assert message["name"] == name
        assert message["summary"] == spec.summary
        assert message["title"] and message["contentType"] == "application/json"
        payload = message["payload"]
        assert payload["properties"]["dataversion"]["const"] == spec.version
        assert set(payload["properties"]) == set(schemas_["Envelope"]["properties"])
        assert payload["additionalProperties"] is False and {"type", "source", "data"} <= set(payload["required"])
        data = resolve(document, payload["properties"]["data"]["$ref"])
        assert data["title"] == spec.model.__name__
        assert set(data.get("properties", {})) == set(spec.model.model_fields)
        headers = resolve(document, message["headers"]["$ref"])
        assert {"x-roost-id", "x-roost-type"} <= set(headers["properties"])
        assert ("authorization" in headers["properties"]) is (spec.kind is MessageKind.COMMAND)
        if spec.result_model is not None:
            assert resolve(document, f"#/components/schemas/{spec.result_model.__name__}")


def test_operations(document: dict[str, Any]) -> None:
    registry = load()
    operations = document["operations"]
    assert len(operations) == len(registry)
    reply_channel = f"#/channels/{asyncapi.REPLY_CHANNEL}"
    for spec in registry:
        name = f"{spec.type}.v{spec.version}"
        action = "receive" if spec.kind is MessageKind.COMMAND else "send"
        op = operations[f"{name}.{action}"]
        assert op["action"] == action
        assert op["x-roost-owner"] == spec.owner
        channel = resolve(document, op["channel"]["$ref"])
        assert channel["address"] == spec.type
        for ref in op["messages"]:
            assert ref["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), "messages of the operation's channel"
            assert resolve(document, ref["$ref"])["name"] == name
        if spec.kind is MessageKind.COMMAND:
            assert op["x-roost-min-role"] == spec.min_role.value
            reply = op["reply"]
            assert reply["channel"]["$ref"] == reply_channel
            assert resolve(document, reply_channel)["address"] is None, "a reply address needs a null channel address"
            assert reply["address"]["location"] == "$message.header#/x-roost-reply-to"
            for ref in reply["messages"]:
                assert ref["$ref"].startswith(reply_channel + "/messages/")
                reply_message = resolve(document, ref["$ref"])
                assert reply_message["payload"]["properties"]["type"]["const"] == REPLY_TYPE
                assert reply_message["payload"]["properties"]["data"]["$ref"] == "#/components/schemas/CommandReply"
            result = reply.get("x-roost-result")
            assert (result is None) is (spec.result_model is None)
            if spec.result_model is not None:
                assert resolve(document, result["$ref"])["title"] == spec.result_model.__name__
        else:
            assert "reply" not in op and "x-roost-min-role" not in op


def test_ping_is_described_as_asked(document: dict[str, Any]) -> None:
    message = document["components"]["messages"]["roost.cmd.system.ping.v1"]
    assert message["payload"]["properties"]["data"] == {"$ref": "#/components/schemas/Ping"}
    assert document["operations"]["roost.cmd.system.ping.v1.receive"]["x-roost-min-role"] == "reader"
    assert document["components"]["schemas"]["Ping"]["additionalProperties"] is False
    selection = document["components"]["schemas"]["DlqReplay"]
    assert len(selection["oneOf"]) == 3, "the exactly-one rule is in the schema too"


def test_document_header_names_are_the_bus_headers() -> None:
    from services.core.bus import abc

    assert asyncapi.H_MESSAGE_ID == abc.H_MESSAGE_ID
    assert asyncapi.H_TYPE == abc.H_TYPE
    assert asyncapi.H_ATTEMPT == abc.H_ATTEMPT
    assert asyncapi.H_AUTHORIZATION == abc.H_AUTHORIZATION
    assert asyncapi.H_REPLY_TO == abc.H_REPLY_TO


def test_reply_type_cannot_be_registered() -> None:
    mutated = copy_registry(load())
    with pytest.raises(ValueError, match="reply to every command"):
        mutated.event(REPLY_TYPE, "core", HostLocked, "would clash with the reply channel")


def test_command_reply_model() -> None:
    reply = CommandReply.model_validate({"status": "completed", "result": {"replayed": 3}, "command_id": "c",
                                         "command_type": "roost.cmd.dlq.replay"})
    assert reply.ok
    assert not CommandReply(status="rejected", reason="no", command_id="c", command_type="t").ok


def test_a_reply_made_up_for_an_unhandled_command_is_told_from_a_refusal_saying_the_same() -> None:
    made_up = CommandReply.no_handler("c1", "roost.cmd.system.ping")
    assert made_up.unhandled and made_up.status is ReplyStatus.REJECTED
    refusal = CommandReply.model_validate(made_up.model_dump(mode="json"))   # what a service could send
    assert refusal.reason == made_up.reason and not refusal.unhandled
    assert "unhandled" not in made_up.model_dump()                          # never on the wire
