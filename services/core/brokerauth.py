"""Who may publish and consume what on the broker: one policy table, rendered for NATS and RabbitMQ.

Pure: no I/O.  ``brokerauth_apply`` puts the rendered result onto a broker.

A ``Principal`` is one broker user: a service (all replicas share it), a host agent
(``agent-<hostname>``), a subcloud's sync agent (``dcagent-<subcloud>``), or the operator's ``roost``
command.  It says, in bus terms:

* ``publishes``: event subject patterns it may publish (``roost.host.>``);
* ``sends``: command subject patterns it may send, waiting for a reply (``roost.cmd.>``);
* ``consumes``: its durable subscriptions, ``Consumer(group, pattern)``, exactly as it subscribes (the
  broker-side names of a subscription are derived from the pair, and the broker is told those exact
  names).  A consumer of ``roost.cmd.*`` serves commands: it may reply to whoever may send them;
* implied: every consumer group may dead-letter into its own ``roost.dlq.<group>``.

From a ``Policy`` (a list of principals, checked for clashes) this module derives:

* ``nats_permissions``: per user, publish / subscribe allow lists (deny everything else), covering the
  JetStream API the user needs for its own durable consumers (``$JS.API.CONSUMER.CREATE`` only in the
  form that names the filter subject, so a consumer can never read more than its pattern), acks
  (``$JS.ACK``), and replies: each user gets a private inbox prefix ``_INBOX.<user>`` (the client must
  connect with ``inbox_prefix=nats_inbox_prefix(user)``); only principals that serve a command a user
  may send may publish into that user's inbox (``private_inboxes=False`` renders the weaker shared
  ``_INBOX.>`` for clients that cannot set their prefix).  ``render_nats_config`` writes the ``authorization``
  block (and optionally ``tls``) of a nats-server config file;
* ``rabbitmq_permissions``: per user, the vhost ``configure / write / read`` regular expressions over
  exchange and queue names, and the topic permissions (regexes over routing keys, for publishing, and
  over binding keys, for binding) on ``roost.events`` and ``roost.commands``.
  ``rabbitmq_operations`` turns them into ``rabbitmqctl`` operations in a safe order.

Limits of RabbitMQ's model (AMQP 0-9-1), which the broker cannot close and the bus layer must:

* replies and delayed retries travel through the default exchange, and ``write`` on ``amq.default``
  lets a user route a message to *any* queue by its name (topic permissions apply to topic exchanges
  only).  Commands are still authorised by the principal they carry; events are not;
* the broker does not check the topic permission of a queue's ``x-dead-letter-routing-key``;
* ``shared_topology=True`` (what the RabbitMQ transport needs today: it declares the shared exchanges
  on connect) grants ``configure`` on ``roost.events`` / ``roost.commands`` / ``roost.unrouted``, which
  also allows deleting them.  Principals with ``shared_topology=False`` must declare them passively.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import SecretStr

from services.core.bus.abc import COMMAND_PREFIX, DLQ_PREFIX
from services.core.bus.rabbitmq_topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    UNROUTED_EXCHANGE,
    UNROUTED_NOTIFY_EXCHANGE,
    UNROUTED_QUEUE,
)
from services.core.bus.subjects import (
    InvalidSubject,
    check_group,
    check_pattern,
    dlq_subject,
    domain_of,
    durable_name,
    stream_name,
)

__all__ = [
    "AGENT_PREFIX",
    "DCAGENT_PREFIX",
    "DENY",
    "DENY_ROUTING_KEY",
    "MANAGED_TAG",
    "OPERATOR_NAME",
    "AddUser",
    "Consumer",
    "NatsPermissions",
    "NatsTls",
    "PasswordHasher",
    "Policy",
    "PolicyError",
    "Principal",
    "PrincipalKind",
    "RabbitOp",
    "RabbitPermissions",
    "SetPermissions",
    "SetTopicPermissions",
    "SetUserTags",
    "TopicPermission",
    "agent",
    "agent_user",
    "binding_regex",
    "check_password",
    "dcagent",
    "dcagent_user",
    "default_stream_of",
    "nats_inbox_prefix",
    "nats_permissions",
    "operator",
    "overlaps",
    "password_variable",
    "rabbitmq_operations",
    "rabbitmq_permissions",
    "rabbitmq_script",
    "render_nats_authorization",
    "render_nats_config",
    "render_nats_tls",
    "roost_policy",
    "routing_key_regex",
    "service",
]


class PolicyError(ValueError):
    """The policy is inconsistent or names something the brokers cannot express.  Never holds a secret."""


class PrincipalKind(StrEnum):
    SERVICE = "service"
    AGENT = "agent"
    DCAGENT = "dcagent"
    OPERATOR = "operator"


AGENT_PREFIX = "agent-"
DCAGENT_PREFIX = "dcagent-"
OPERATOR_NAME = "roost-cli"
MANAGED_TAG = "roost"              # RabbitMQ user tag marking the users this policy owns

# Broker user names: one NATS subject token (they become the inbox prefix) and safe in any shell.
_USER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A host name as an agent's identity: one RFC 1123 label, lower case (it is a subject token).
_HOSTNAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,55}[a-z0-9])?$")
# A subcloud's name (schemas.dcsync.SubcloudName): one label, at most 48 characters.
_SUBCLOUD = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")
_LIFECYCLE = ("roost.system.service_started", "roost.system.service_stopping")
FAULTS = "roost.fault.>"           # alarms raised and cleared by any service (services.alarms consumes them)
DEGRADES = "roost.degrade.>"       # reasons a host is degraded, from any service (services.inventory consumes them)


# -- patterns ------------------------------------------------------------------------------------


def overlaps(a: str, b: str) -> bool:
    """Whether some subject matches both NATS patterns ``a`` and ``b``."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        if i >= len(ta) or i >= len(tb):
            return False
        x, y = ta[i], tb[i]
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


def _is_command_pattern(pattern: str) -> bool:
    return pattern.startswith(COMMAND_PREFIX + ".")


def _under_roost(pattern: str, what: str) -> str:
    try:
        check_pattern(pattern)
    except InvalidSubject as exc:
        raise PolicyError(f"{what}: {exc}") from None
    if not pattern.startswith("roost."):
        raise PolicyError(f"{what}: {pattern!r} is not under roost.")
    return pattern


# -- principals ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Consumer:
    """One durable subscription: a consumer group and the pattern it subscribes to."""

    group: str
    pattern: str

    def __post_init__(self) -> None:
        try:
            check_group(self.group)
        except InvalidSubject as exc:
            raise PolicyError(str(exc)) from None
        _under_roost(self.pattern, f"consumer group {self.group}")

    @property
    def durable(self) -> str:
        """Its queue name on RabbitMQ and durable consumer name on NATS."""
        return durable_name(self.group, self.pattern)

    @property
    def serves_commands(self) -> bool:
        return _is_command_pattern(self.pattern)


@dataclass(frozen=True, slots=True)
class Principal:
    """One broker user and what it may do on the bus.  Build it with ``service``, ``agent`` or ``operator``."""

    name: str
    kind: PrincipalKind
    publishes: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    consumes: tuple[Consumer, ...] = ()
    manages_streams: bool = False        # NATS: may create and update JetStream streams
    shared_topology: bool = True         # RabbitMQ: may (re)declare the shared exchanges and queue

    def __post_init__(self) -> None:
        if not _USER.match(self.name):
            raise PolicyError(f"bad principal name {self.name!r}: lower-case letters, digits, _ and -, "
                              "1-63 characters")
        for pattern in self.publishes:
            _under_roost(pattern, f"{self.name} publishes")
            if _is_command_pattern(pattern):
                raise PolicyError(f"{self.name} publishes {pattern}: commands are sent (sends=), not published")
        for pattern in self.sends:
            _under_roost(pattern, f"{self.name} sends")
            if not _is_command_pattern(pattern):
                raise PolicyError(f"{self.name} sends {pattern}: only roost.cmd.* patterns are commands")
        if len(set(self.consumes)) != len(self.consumes):
            raise PolicyError(f"{self.name} lists the same consumer twice")

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.group for c in self.consumes))

    @property
    def dead_letter_subjects(self) -> tuple[str, ...]:
        return tuple(dlq_subject(g) for g in self.groups)

    @property
    def serves(self) -> tuple[Consumer, ...]:
        return tuple(c for c in self.consumes if c.serves_commands)

    @property
    def reads(self) -> tuple[Consumer, ...]:
        return tuple(c for c in self.consumes if not c.serves_commands)


def _domain_pattern(value: str, prefix: str) -> str:
    """``host`` -> ``<prefix>.host.>``; a full pattern (``roost.…``) is kept as it is."""
    if value.startswith("roost."):
        return value
    if not re.match(r"^[a-z0-9_-]+$", value):
        raise PolicyError(f"bad domain {value!r}")
    return f"{prefix}.{value}.>"


def service(name: str, *, events: Iterable[str] = (), serves: Iterable[str] = (), reads: Iterable[str] = (),
            sends: Iterable[str] = (), consumers: Iterable[Consumer] = (), group: str | None = None,
            manages_streams: bool = True, shared_topology: bool = True) -> Principal:
    """A service: the event domains it owns (``host`` or a full pattern), the commands it serves (a
    command domain ``host`` -> ``roost.cmd.host.>``, or a pattern), the event patterns it reads, the
    commands it sends.  ``serves`` and ``reads`` are consumed by ``group`` (default: the service's
    name); other groups go in ``consumers``.  Every service may announce its own start and stop, and
    raise and clear alarms (``roost.fault.>``, consumed by the alarms service) and report why a host is
    degraded (``roost.degrade.>``, consumed by inventory)."""
    grp = group or name
    published = [_domain_pattern(e, "roost") for e in events]
    published += [s for s in (*_LIFECYCLE, FAULTS, DEGRADES) if not any(overlaps(s, p) for p in published)]
    consumes = [Consumer(grp, _domain_pattern(s, COMMAND_PREFIX)) for s in serves]
    consumes += [Consumer(grp, p) for p in reads]
    consumes += list(consumers)
    return Principal(name, PrincipalKind.SERVICE, publishes=tuple(dict.fromkeys(published)),
                     sends=tuple(dict.fromkeys(sends)), consumes=tuple(dict.fromkeys(consumes)),
                     manages_streams=manages_streams, shared_topology=shared_topology)


def agent_user(hostname: str) -> str:
    """The broker user of the agent on ``hostname``."""
    if not _HOSTNAME.match(hostname):
        raise PolicyError(f"bad agent host name {hostname!r}: one lower-case DNS label (letters, digits, "
                          "-), at most 57 characters")
    return AGENT_PREFIX + hostname


def agent(hostname: str, *, shared_topology: bool = True) -> Principal:
    """The agent on ``hostname``: publishes only ``roost.agent.<hostname>.>``, consumes only
    ``roost.cmd.agent.<hostname>.>`` (its group is its user name) and replies to those commands."""
    user = agent_user(hostname)
    return Principal(user, PrincipalKind.AGENT, publishes=(f"roost.agent.{hostname}.>",),
                     consumes=(Consumer(user, f"{COMMAND_PREFIX}.agent.{hostname}.>"),),
                     manages_streams=False, shared_topology=shared_topology)


def dcagent_user(subcloud: str) -> str:
    """The broker user of the sync agent of ``subcloud``."""
    if not _SUBCLOUD.match(subcloud):
        raise PolicyError(f"bad subcloud name {subcloud!r}: one lower-case DNS label (letters, digits, -), "
                          "at most 48 characters")
    return DCAGENT_PREFIX + subcloud


def dcagent(subcloud: str, *, shared_topology: bool = True) -> Principal:
    """The sync agent of ``subcloud``: publishes only ``roost.dcagent.<subcloud>.>`` (its heartbeats),
    consumes only ``roost.cmd.sync.<subcloud>.>`` (its group is its user name) and replies to those
    commands.  Another subcloud's sync commands are out of its reach."""
    user = dcagent_user(subcloud)
    return Principal(user, PrincipalKind.DCAGENT, publishes=(f"roost.dcagent.{subcloud}.>",),
                     consumes=(Consumer(user, f"{COMMAND_PREFIX}.sync.{subcloud}.>"),),
                     manages_streams=False, shared_topology=shared_topology)


def operator(name: str = OPERATOR_NAME, *, sends: Iterable[str] = (f"{COMMAND_PREFIX}.>",)) -> Principal:
    """The operator's ``roost`` command: sends commands and reads their replies; publishes no event."""
    return Principal(name, PrincipalKind.OPERATOR, sends=tuple(sends), manages_streams=False)


@dataclass(frozen=True, slots=True)
class Policy:
    """Every principal of one roost system.  Names are unique; a consumer group belongs to one principal."""

    principals: tuple[Principal, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        names: set[str] = set()
        for p in self.principals:
            if p.name in names:
                raise PolicyError(f"principal {p.name} is listed twice")
            names.add(p.name)
            for g in p.groups:
                if g in seen and seen[g] != p.name:
                    raise PolicyError(f"consumer group {g} belongs to both {seen[g]} and {p.name}")
                seen[g] = p.name

    def get(self, name: str) -> Principal:
        for p in self.principals:
            if p.name == name:
                return p
        raise PolicyError(f"no principal named {name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.principals)

    def senders_to(self, server: Principal) -> tuple[Principal, ...]:
        """The principals that may send a command ``server`` serves (and so get its replies)."""
        served = [c.pattern for c in server.serves]
        return tuple(p for p in self.principals
                     if any(overlaps(s, c) for s in p.sends for c in served))


# The core service (dead-letter keeper, dlq commands, ping) as it subscribes in services/core.
_CORE = service(
    "core",
    events=("roost.>",),            # the keeper replays dead letters on their original subjects
    sends=(f"{COMMAND_PREFIX}.>",),  # ... commands included
    consumers=(Consumer("dlq-keeper", f"{DLQ_PREFIX}.>"),
               Consumer("core-dlq", f"{COMMAND_PREFIX}.dlq.>"),
               Consumer("core-system", f"{COMMAND_PREFIX}.system.>"),
               Consumer("core-token", f"{COMMAND_PREFIX}.token.>")),
)

# The services' rows: the domains each owns (ARCHITECTURE.md).  A service adds the events it reads and
# the commands it sends here when it lands.
_SERVICES = (
    _CORE,
    service("inventory", events=("host",), serves=("host",),
            reads=("roost.agent.>", DEGRADES, "roost.heartbeat.host_health", "roost.heartbeat.active_controller"),
            sends=(f"{COMMAND_PREFIX}.hostservices.>", f"{COMMAND_PREFIX}.heartbeat.>", f"{COMMAND_PREFIX}.agent.>")),
    service("heartbeat", events=("heartbeat",), serves=("heartbeat",),
            reads=("roost.host.>", "roost.agent.*.heartbeat_alarm"),
            sends=(f"{COMMAND_PREFIX}.host.>", f"{COMMAND_PREFIX}.agent.>"),
            # with a controller pair, each controller's monitor reads every host event and agent alarm (its
            # own group)
            consumers=tuple(Consumer(f"heartbeat-controller-{i}", pattern) for i in (0, 1)
                            for pattern in ("roost.host.>", "roost.agent.*.heartbeat_alarm"))),
    service("alarms", events=("alarm",), serves=("alarm",), reads=(FAULTS, "roost.host.deleted")),
    service("orchestrator", events=("strategy",), serves=("strategy", "hostservices"),
            sends=(f"{COMMAND_PREFIX}.host.>", f"{COMMAND_PREFIX}.agent.>", f"{COMMAND_PREFIX}.alarm.>")),
    # the sync commands (roost.cmd.sync.<subcloud>.>) are served by each subcloud's agent (dcagent()), not here
    service("dcsync", events=("sync", "subcloud"), serves=("subcloud",), reads=("roost.dcagent.*.heartbeat",),
            sends=(f"{COMMAND_PREFIX}.sync.>",)),
)


def roost_policy(agent_hostnames: Iterable[str] = (), *, operators: Iterable[str] = (OPERATOR_NAME,),
                 extra: Iterable[Principal] = (), subclouds: Iterable[str] = ()) -> Policy:
    """The policy of a roost system: its services, one agent per host, one sync agent per subcloud, the
    operator command(s)."""
    principals = [*_SERVICES, *(agent(h) for h in agent_hostnames), *(dcagent(s) for s in subclouds),
                  *(operator(o) for o in operators), *extra]
    return Policy(tuple(principals))


# -- NATS ----------------------------------------------------------------------------------------


_SHARED_INBOX = "_INBOX"


def nats_inbox_prefix(user: str) -> str:
    """The inbox prefix ``user`` must connect with (nats-py ``connect(inbox_prefix=...)``)."""
    return f"{_SHARED_INBOX}.{user}"


def default_stream_of(pattern: str) -> str:
    """The JetStream stream holding a pattern's subjects: one per domain (``roost.cmd.…`` -> ROOST_CMD)."""
    return stream_name(domain_of(pattern))


@dataclass(frozen=True, slots=True)
class NatsPermissions:
    """One NATS user's allow lists (everything else is denied)."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    @property
    def inbox_prefix(self) -> str:
        return nats_inbox_prefix(self.user)


def _stream(stream_of: Callable[[str], str], pattern: str, who: str) -> str:
    try:
        return stream_of(pattern)
    except InvalidSubject:
        raise PolicyError(f"{who}: {pattern} spans several domains; a JetStream consumer needs one "
                          "stream, so subscribe per domain") from None


def _maybe_stream(stream_of: Callable[[str], str], pattern: str) -> str | None:
    try:
        return stream_of(pattern)
    except InvalidSubject:
        return None


def nats_permissions(policy: Policy, *, private_inboxes: bool = True,
                     stream_of: Callable[[str], str] = default_stream_of) -> list[NatsPermissions]:
    """Per user, what it may publish and subscribe to on NATS (core subjects and the JetStream API).

    ``private_inboxes=False`` is for clients that keep nats-py's shared ``_INBOX`` prefix: every user
    may then subscribe to ``_INBOX.>`` (and so read replies meant for others), and whoever serves
    commands may reply into any inbox."""
    out: list[NatsPermissions] = []
    for p in policy.principals:
        pub: list[str] = [*p.publishes, *p.sends, *p.dead_letter_subjects]
        senders = policy.senders_to(p)
        if private_inboxes:
            pub += [nats_inbox_prefix(sender.name) + ".>" for sender in senders]
        elif senders:
            pub.append(_SHARED_INBOX + ".>")
        pub += ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
        touched = {s for s in (_maybe_stream(stream_of, x) for x in (*p.publishes, *p.sends)) if s}
        sub: list[str] = [(nats_inbox_prefix(p.name) if private_inboxes else _SHARED_INBOX) + ".>"]
        for c in p.consumes:
            stream = _stream(stream_of, c.pattern, f"{p.name}'s group {c.group}")
            touched.add(stream)
            d = c.durable
            pub += [f"$JS.API.CONSUMER.CREATE.{stream}.{d}.{c.pattern}",
                    f"$JS.API.CONSUMER.INFO.{stream}.{d}",
                    f"$JS.API.CONSUMER.DELETE.{stream}.{d}",
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{d}",
                    f"$JS.ACK.{stream}.{d}.>"]
            sub += [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{d}",
                    f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.{d}"]
        for stream in sorted(touched):
            pub.append(f"$JS.API.STREAM.INFO.{stream}")
        for stream in sorted({s for s in (_maybe_stream(stream_of, x) for x in p.sends) if s}):
            # is any group consuming this command? (the NATS transport reads the consumers' filters)
            pub += [f"$JS.API.CONSUMER.NAMES.{stream}", f"$JS.API.CONSUMER.LIST.{stream}"]
        if p.manages_streams:
            pub += ["$JS.API.STREAM.CREATE.*", "$JS.API.STREAM.UPDATE.*", "$JS.API.STREAM.INFO.*",
                    "$JS.API.STREAM.LIST", "$JS.API.CONSUMER.NAMES.*", "$JS.API.CONSUMER.LIST.*"]
        out.append(NatsPermissions(p.name, tuple(dict.fromkeys(pub)), tuple(dict.fromkeys(sub))))
    return out


def check_password(user: str, password: str) -> str:
    """Refuse passwords a broker would mangle or read as something else.  The message names the user only."""
    if not password:
        raise PolicyError(f"empty password for {user} (RabbitMQ would disable password login)")
    if password != password.strip():
        raise PolicyError(f"password for {user} starts or ends with white space (rabbitmqctl strips it)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in password):
        raise PolicyError(f"password for {user} has control characters")
    if password.startswith("$2"):
        raise PolicyError(f"password for {user} starts with $2: nats-server would take it for a bcrypt hash")
    return password


def _quote(text: str) -> str:
    # nats-server's config parser reads JSON-style quoted strings (\" and \\ escapes); control
    # characters never get here (check_password, and names are validated), so json.dumps is exact.
    return json.dumps(text, ensure_ascii=False)


def _secret(passwords: Mapping[str, SecretStr | str], user: str) -> str:
    try:
        value = passwords[user]
    except KeyError:
        raise PolicyError(f"no password for {user}") from None
    return check_password(user, value.get_secret_value() if isinstance(value, SecretStr) else value)


def _nats_list(items: Sequence[str]) -> str:
    if not items:
        # nats-server reads an empty allow list as "no restriction": never write one
        raise PolicyError("an empty NATS allow list would allow everything")
    return "[" + ", ".join(_quote(i) for i in items) + "]"


PasswordHasher = Callable[[str], str]


def render_nats_authorization(perms: Sequence[NatsPermissions], passwords: Mapping[str, SecretStr | str], *,
                              hasher: PasswordHasher | None = None) -> str:
    """The ``authorization { users = [...] }`` block.  ``hasher`` (a bcrypt function) writes hashes
    instead of passwords; without one the file holds passwords and must stay readable by its owner only."""
    lines = ["authorization {", "  users = ["]
    for perm in perms:
        secret = _secret(passwords, perm.user)
        if hasher is not None:
            secret = hasher(secret)
            if not re.match(r"^\$2[abxy]\$\d\d\$", secret):
                raise PolicyError(f"the password hasher did not return a bcrypt hash for {perm.user}")
        lines += [
            "    {",
            f"      user: {_quote(perm.user)}",
            f"      password: {_quote(secret)}",
            "      permissions: {",
            f"        publish: {{ allow: {_nats_list(perm.publish)} }}",
            f"        subscribe: {{ allow: {_nats_list(perm.subscribe)} }}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NatsTls:
    """TLS for client connections to nats-server.  ``verify`` also asks clients for a certificate."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    verify: bool = False
    timeout: float = 2.0


def render_nats_tls(tls: NatsTls) -> str:
    lines = ["tls {", f"  cert_file: {_quote(str(tls.cert_file))}", f"  key_file: {_quote(str(tls.key_file))}"]
    if tls.ca_file is not None:
        lines.append(f"  ca_file: {_quote(str(tls.ca_file))}")
    lines += [f"  verify: {'true' if tls.verify else 'false'}", f"  timeout: {tls.timeout:g}", "}"]
    return "\n".join(lines) + "\n"


def render_nats_config(policy: Policy, passwords: Mapping[str, SecretStr | str], *,
                       hasher: PasswordHasher | None = None, tls: NatsTls | None = None,
                       server_name: str | None = None, private_inboxes: bool = True,
                       stream_of: Callable[[str], str] = default_stream_of) -> str:
    """A nats-server config file with the users of ``policy`` (and TLS); listen address, JetStream and
    the store directory come from the command line (``NatsServer``).  Give the ``server_name`` the
    server runs with (``NatsServer.server_name``, ``-n``): a config reload that does not find the same
    name in the file is refused ("config reload not supported for ServerName")."""
    head = "# Written by roost (services/core/brokerauth.py) from its broker policy: do not edit.\n"
    if server_name is not None:
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", server_name):
            raise PolicyError(f"bad NATS server name {server_name!r}")
        head += f"server_name: {_quote(server_name)}\n"
    perms = nats_permissions(policy, private_inboxes=private_inboxes, stream_of=stream_of)
    body = render_nats_authorization(perms, passwords, hasher=hasher)
    return head + body + (render_nats_tls(tls) if tls is not None else "")


# -- RabbitMQ ------------------------------------------------------------------------------------

DENY = "^$"                 # vhost permission that matches no exchange or queue
DENY_ROUTING_KEY = "(?!)"   # topic permission that matches no routing key, not even the empty one
_TOKEN = r"[^.]+"


def _alternatives(items: Iterable[str]) -> str:
    unique = list(dict.fromkeys(items))
    if not unique:
        return DENY
    return "^(?:" + "|".join(unique) + ")$"


def _pattern_regex(pattern: str, one_token: str, rest: str) -> str:
    parts: list[str] = []
    for token in pattern.split("."):
        if token == ">":
            parts.append(rest)
        elif token == "*":
            parts.append(one_token)
        else:
            parts.append(token)             # [A-Za-z0-9_-]: nothing to escape outside a class
    return "\\.".join(parts)


def routing_key_regex(pattern: str) -> str:
    """A regex (unanchored body) of the routing keys a publisher may use for ``pattern``."""
    return _pattern_regex(pattern, _TOKEN, f"{_TOKEN}(?:\\.{_TOKEN})*")


def binding_regex(pattern: str) -> str:
    """A regex (unanchored body) of the AMQP binding keys no broader than ``pattern``: a literal token
    stays literal, ``*`` admits one word or ``*`` (never ``#``), ``>`` admits any tail with at least one
    word that is not ``#`` (``#`` alone would also match zero words, which ``>`` does not)."""
    return _pattern_regex(pattern, r"[^.#]+", f"(?:{_TOKEN}\\.)*[^.#]+(?:\\.{_TOKEN})*")


def _topic_regex(bodies: Iterable[str]) -> str:
    unique = list(dict.fromkeys(bodies))
    return "^(?:" + "|".join(unique) + ")$" if unique else DENY_ROUTING_KEY


def _name(text: str) -> str:
    return text.replace(".", "\\.")


@dataclass(frozen=True, slots=True)
class TopicPermission:
    exchange: str
    write: str          # routing keys it may publish with
    read: str           # binding keys it may bind with


@dataclass(frozen=True, slots=True)
class RabbitPermissions:
    """One RabbitMQ user's permissions in one virtual host."""

    user: str
    vhost: str
    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...]
    tags: tuple[str, ...] = (MANAGED_TAG,)


def rabbitmq_permissions(policy: Policy, *, vhost: str = "/") -> list[RabbitPermissions]:
    """Per user, the regexes RabbitMQ checks (see the module docstring for what they cannot stop)."""
    if not re.match(r"^[A-Za-z0-9/_.-]{1,255}$", vhost):
        raise PolicyError(f"bad RabbitMQ virtual host {vhost!r}")
    per_connection_reply = _name(REPLY_QUEUE_PREFIX) + "[0-9a-f]{32}"
    per_connection_notice = _name(UNROUTED_NOTIFY_EXCHANGE) + "\\.[0-9a-f]{32}"
    out: list[RabbitPermissions] = []
    for p in policy.principals:
        queues = [_name(c.durable) + "(?:\\.retry\\.[0-9]+)?" for c in p.consumes]
        configure = [per_connection_reply, per_connection_notice, *queues]
        write = [per_connection_notice, *queues]               # queues it binds
        read = [per_connection_reply, per_connection_notice, _name(UNROUTED_NOTIFY_EXCHANGE), *queues]
        if p.shared_topology:
            configure += [_name(x) for x in (EVENTS_EXCHANGE, COMMANDS_EXCHANGE, UNROUTED_EXCHANGE,
                                             UNROUTED_QUEUE, UNROUTED_NOTIFY_EXCHANGE)]
            write += [_name(UNROUTED_NOTIFY_EXCHANGE), _name(UNROUTED_QUEUE)]
            read += [_name(UNROUTED_EXCHANGE)]
        if p.publishes or p.consumes:       # events, dead letters, and the DLX of its group queues
            write.append(_name(EVENTS_EXCHANGE))
        if p.sends:
            write.append(_name(COMMANDS_EXCHANGE))
        if p.consumes:                      # replies and delayed retries go through the default exchange
            write.append(_name("amq.default"))
        if p.reads:
            read.append(_name(EVENTS_EXCHANGE))
        if p.serves:
            read.append(_name(COMMANDS_EXCHANGE))
        topics = (
            TopicPermission(
                EVENTS_EXCHANGE,
                write=_topic_regex(routing_key_regex(x) for x in (*p.publishes, *p.dead_letter_subjects)),
                read=_topic_regex(binding_regex(c.pattern) for c in p.reads)),
            TopicPermission(
                COMMANDS_EXCHANGE,
                write=_topic_regex(routing_key_regex(x) for x in p.sends),
                read=_topic_regex(binding_regex(c.pattern) for c in p.serves)),
        )
        out.append(RabbitPermissions(p.name, vhost, _alternatives(configure), _alternatives(write),
                                     _alternatives(read), topics))
    return out


@dataclass(frozen=True, slots=True)
class AddUser:
    """Create the user, or set its password when it exists.  The password goes on standard input."""

    user: str
    password: SecretStr = field(repr=False)

    def args(self, *, exists: bool = False) -> tuple[str, ...]:
        return ("change_password", self.user) if exists else ("add_user", self.user)

    def stdin(self) -> bytes:
        return (self.password.get_secret_value() + "\n").encode()


@dataclass(frozen=True, slots=True)
class SetUserTags:
    user: str
    tags: tuple[str, ...]

    def args(self) -> tuple[str, ...]:
        return ("set_user_tags", self.user, *self.tags)


@dataclass(frozen=True, slots=True)
class SetTopicPermissions:
    vhost: str
    user: str
    exchange: str
    write: str
    read: str

    def args(self) -> tuple[str, ...]:
        return ("set_topic_permissions", "-p", self.vhost, self.user, self.exchange, self.write, self.read)


@dataclass(frozen=True, slots=True)
class SetPermissions:
    vhost: str
    user: str
    configure: str
    write: str
    read: str

    def args(self) -> tuple[str, ...]:
        return ("set_permissions", "-p", self.vhost, self.user, self.configure, self.write, self.read)


RabbitOp = AddUser | SetUserTags | SetTopicPermissions | SetPermissions


def rabbitmq_operations(perms: Sequence[RabbitPermissions],
                        passwords: Mapping[str, SecretStr | str]) -> list[RabbitOp]:
    """The ``rabbitmqctl`` operations, per user in this order: the user and its password, its tags, its
    topic permissions, then its vhost permissions.  Topic permissions come first because a user
    without any on an exchange may publish there with any routing key: never grant ``write`` before
    the routing keys are narrowed."""
    ops: list[RabbitOp] = []
    for perm in perms:
        ops.append(AddUser(perm.user, SecretStr(_secret(passwords, perm.user))))
        ops.append(SetUserTags(perm.user, perm.tags))
        ops += [SetTopicPermissions(perm.vhost, perm.user, t.exchange, t.write, t.read) for t in perm.topics]
        ops.append(SetPermissions(perm.vhost, perm.user, perm.configure, perm.write, perm.read))
    return ops


def password_variable(user: str) -> str:
    """The environment variable ``rabbitmq_script`` reads ``user``'s password from."""
    return "ROOST_BROKER_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def rabbitmq_script(ops: Sequence[RabbitOp]) -> str:
    """A POSIX shell script doing ``ops`` for an operator to read or run; passwords come from environment
    variables (``password_variable``), never from the script.  Existing users get ``change_password``."""
    lines = ["#!/bin/sh", "# Written by roost from its broker policy (services/core/brokerauth.py).", "set -eu"]
    for op in ops:
        if isinstance(op, AddUser):
            var = password_variable(op.user)
            user = shlex.quote(op.user)
            lines.append(f'if rabbitmqctl -s list_users | cut -f1 | grep -qx {user}; then verb=change_password; '
                         f'else verb=add_user; fi')
            lines.append(f'printf \'%s\\n\' "${{{var}:?set {var}}}" | rabbitmqctl -q "$verb" {user}')
        else:
            lines.append("rabbitmqctl -q " + " ".join(shlex.quote(a) for a in op.args()))
    return "\n".join(lines) + "\n"
