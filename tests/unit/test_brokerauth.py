"""The broker policy, pure: who may publish and consume what, as NATS allow lists and RabbitMQ regexes.

The properties are checked the way the brokers check them: NATS allow lists with the bus's own subject
matching (``matches``), RabbitMQ regexes with ``re.search`` (RabbitMQ runs them unanchored; ours anchor).
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from services.core import deadletters, system
from services.core.brokerauth import (
    DENY_ROUTING_KEY,
    AddUser,
    Consumer,
    Policy,
    PolicyError,
    Principal,
    PrincipalKind,
    SetPermissions,
    SetTopicPermissions,
    SetUserTags,
    agent,
    agent_user,
    binding_regex,
    check_password,
    dcagent,
    dcagent_user,
    nats_inbox_prefix,
    nats_permissions,
    operator,
    overlaps,
    rabbitmq_operations,
    rabbitmq_permissions,
    rabbitmq_script,
    render_nats_authorization,
    render_nats_config,
    roost_policy,
    routing_key_regex,
    service,
)
from services.core.bus.rabbitmq_topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE, retry_queue_name
from services.core.bus.subjects import durable_name, matches, to_amqp_binding

hostnames = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z")
words = st.sampled_from(["roost", "cmd", "agent", "host", "lock", "heartbeat", "h1", "h2", "x", "dlq", "state"])
tails = st.lists(words, min_size=1, max_size=4).map(".".join)


def nats_allows(allow: tuple[str, ...], subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in allow)


def rabbit_allows(regex: str, key: str) -> bool:
    return re.search(regex, key) is not None


def topic(perms: object, exchange: str) -> tuple[str, str]:
    for t in perms.topics:  # type: ignore[attr-defined]
        if t.exchange == exchange:
            return t.write, t.read
    raise AssertionError(f"no topic permission on {exchange}")


def amqp_matches(binding: str, routing_key: str) -> bool:
    """RabbitMQ's topic matching: ``*`` one word, ``#`` zero or more words."""
    b, r = binding.split("."), routing_key.split(".")

    def walk(i: int, j: int) -> bool:
        if i == len(b):
            return j == len(r)
        if b[i] == "#":
            return any(walk(i + 1, k) for k in range(j, len(r) + 1))
        return j < len(r) and (b[i] == "*" or b[i] == r[j]) and walk(i + 1, j + 1)

    return walk(0, 0)


# -- agents can never reach beyond their own subjects -------------------------------------------------


@settings(max_examples=300)
@given(h1=hostnames, h2=hostnames, tail=tails)
def test_no_agent_publishes_to_another_agent_or_a_command(h1: str, h2: str, tail: str) -> None:
    assume(h1 != h2)
    policy = roost_policy([h1, h2])
    me = agent_user(h1)
    forbidden = [f"roost.agent.{h2}.{tail}", f"roost.cmd.{tail}", f"roost.cmd.agent.{h1}.{tail}",
                 f"roost.host.{tail}", f"roost.dlq.{agent_user(h2)}"]

    nats = {p.user: p for p in nats_permissions(policy)}[me]
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}[me]
    events_write, _ = topic(rabbit, EVENTS_EXCHANGE)
    commands_write, _ = topic(rabbit, COMMANDS_EXCHANGE)
    for subject in forbidden:
        assert not nats_allows(nats.publish, subject), subject
        assert not rabbit_allows(events_write, subject), subject
        assert not rabbit_allows(commands_write, subject), subject
    assert commands_write == DENY_ROUTING_KEY
    assert not rabbit_allows(rabbit.write, COMMANDS_EXCHANGE)

    own = f"roost.agent.{h1}.{tail}"
    assert nats_allows(nats.publish, own)
    assert rabbit_allows(events_write, own)


@settings(max_examples=200)
@given(h1=hostnames, h2=hostnames, tail=tails)
def test_an_agent_consumes_only_its_own_commands(h1: str, h2: str, tail: str) -> None:
    assume(h1 != h2)
    policy = roost_policy([h1, h2])
    me, other = agent(h1), agent(h2)
    nats = {p.user: p for p in nats_permissions(policy)}[me.name]
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}[me.name]

    # NATS: no core subscription on roost subjects; JetStream consumers only under its own durable,
    # created only with its own filter subject; never the other agent's durable
    assert not any(s.startswith("roost") for s in nats.subscribe)
    own_durable = me.consumes[0].durable
    for entry in nats.publish:
        if entry.startswith(("$JS.API.CONSUMER.", "$JS.ACK.")) and ".NAMES." not in entry:
            assert own_durable in entry
        assert other.consumes[0].durable not in entry
        if entry.startswith("$JS.API.CONSUMER.CREATE."):
            assert entry.endswith(f".{own_durable}.roost.cmd.agent.{h1}.>")
    assert not nats_allows(nats.subscribe, f"_INBOX.{agent_user(h2)}.{tail}")
    assert not nats_allows(nats.subscribe, f"_INBOX.roost-cli.{tail}")

    # RabbitMQ: may bind only its own command subjects, touch only its own queues
    _, commands_read = topic(rabbit, COMMANDS_EXCHANGE)
    _, events_read = topic(rabbit, EVENTS_EXCHANGE)
    assert rabbit_allows(commands_read, to_amqp_binding(f"roost.cmd.agent.{h1}.>"))
    for binding in (f"roost.cmd.agent.{h2}.{tail}", "roost.cmd.agent.*.#", "roost.cmd.#", "#",
                    f"roost.cmd.agent.{h1}", f"roost.cmd.agent.{h1}.#", f"roost.agent.{h2}.#"):
        assert not rabbit_allows(commands_read, binding), binding
        assert not rabbit_allows(events_read, binding), binding
    other_queue = other.consumes[0].durable
    for regex in (rabbit.configure, rabbit.write, rabbit.read):
        assert not rabbit_allows(regex, other_queue)
        assert not rabbit_allows(regex, retry_queue_name(other_queue, 1.0))
    assert rabbit_allows(rabbit.read, own_durable)
    assert rabbit_allows(rabbit.configure, retry_queue_name(own_durable, 5.0))


def test_agent_replies_only_to_those_who_may_command_it() -> None:
    policy = roost_policy(["h1"])
    me = policy.get("agent-h1")
    assert {p.name for p in policy.senders_to(me)} == {"core", "inventory", "heartbeat", "orchestrator", "roost-cli"}
    nats = {p.user: p for p in nats_permissions(policy)}["agent-h1"]
    assert nats_allows(nats.publish, "_INBOX.roost-cli.abc.1")
    assert not nats_allows(nats.publish, "_INBOX.alarms.abc.1")
    assert nats_allows(nats.subscribe, "_INBOX.agent-h1.abc.1")


def test_the_operator_sends_commands_and_publishes_no_event() -> None:
    policy = roost_policy(["h1"])
    cli = {p.user: p for p in nats_permissions(policy)}["roost-cli"]
    assert nats_allows(cli.publish, "roost.cmd.host.lock")
    assert not nats_allows(cli.publish, "roost.host.state_changed")
    assert not nats_allows(cli.publish, "roost.agent.h1.heartbeat")
    assert cli.subscribe == ("_INBOX.roost-cli.>",)
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}["roost-cli"]
    events_write, _ = topic(rabbit, EVENTS_EXCHANGE)
    commands_write, commands_read = topic(rabbit, COMMANDS_EXCHANGE)
    assert events_write == DENY_ROUTING_KEY and commands_read == DENY_ROUTING_KEY
    assert rabbit_allows(commands_write, "roost.cmd.host.lock")
    assert not rabbit_allows(rabbit.write, "amq.default")        # it neither replies nor retries


def test_services_publish_their_domains_and_serve_their_commands() -> None:
    policy = roost_policy()
    inventory = {p.user: p for p in nats_permissions(policy)}["inventory"]
    assert nats_allows(inventory.publish, "roost.host.state_changed")
    assert nats_allows(inventory.publish, "roost.system.service_started")
    assert not nats_allows(inventory.publish, "roost.alarm.raised")
    assert not nats_allows(inventory.publish, "roost.cmd.host.lock")
    assert nats_allows(inventory.publish, "roost.dlq.inventory")
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}["inventory"]
    _, commands_read = topic(rabbit, COMMANDS_EXCHANGE)
    assert rabbit_allows(commands_read, to_amqp_binding("roost.cmd.host.>"))
    _, events_read = topic(rabbit, EVENTS_EXCHANGE)
    assert rabbit_allows(events_read, to_amqp_binding("roost.agent.>"))


def test_core_groups_are_the_ones_core_subscribes_with() -> None:
    core = roost_policy().get("core")
    assert set(core.groups) == {deadletters.KEEPER_GROUP, deadletters.COMMAND_GROUP, system.SYSTEM_GROUP,
                                system.TOKEN_GROUP}


# -- regexes and patterns mean what the bus means ---------------------------------------------------------

pattern_words = st.sampled_from(["roost", "a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    head = draw(st.lists(pattern_words, min_size=1, max_size=4))
    tail = draw(st.sampled_from([[], [">"]]))
    return ".".join(head + tail)


subjects = st.lists(st.sampled_from(["roost", "a", "b", "c"]), min_size=1, max_size=6).map(".".join)
binding_keys = st.lists(st.sampled_from(["roost", "a", "b", "*", "#"]), min_size=1, max_size=5).map(".".join)


@settings(max_examples=500)
@given(pattern=patterns(), subject=subjects)
def test_routing_key_regex_matches_exactly_the_subjects_of_the_pattern(pattern: str, subject: str) -> None:
    assert rabbit_allows("^(?:" + routing_key_regex(pattern) + ")$", subject) == matches(pattern, subject)


@settings(max_examples=500)
@given(pattern=patterns(), binding=binding_keys, subject=subjects)
def test_binding_regex_never_admits_a_broader_binding(pattern: str, binding: str, subject: str) -> None:
    regex = "^(?:" + binding_regex(pattern) + ")$"
    if rabbit_allows(regex, binding) and amqp_matches(binding, subject):
        assert matches(pattern, subject), (pattern, binding, subject)


@settings(max_examples=300)
@given(pattern=patterns())
def test_binding_regex_admits_the_pattern_itself(pattern: str) -> None:
    assert rabbit_allows("^(?:" + binding_regex(pattern) + ")$", to_amqp_binding(pattern))


@settings(max_examples=500)
@given(a=patterns(), b=patterns())
def test_overlaps_iff_some_subject_matches_both(a: str, b: str) -> None:
    candidates = (".".join(t) for n in range(1, 7) for t in itertools.product(["roost", "a", "b", "c"], repeat=n))
    assert overlaps(a, b) == any(matches(a, s) and matches(b, s) for s in candidates)


# -- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hostname", ["", "H1", "host.example.com", "-h", "h-", "h_1", "a" * 58, "h 1"])
def test_bad_agent_hostnames_are_refused(hostname: str) -> None:
    with pytest.raises(PolicyError):
        agent(hostname)


def test_an_agent_with_the_longest_hostname_is_a_valid_group() -> None:
    assert agent("a" * 57).groups == ("agent-" + "a" * 57,)


def test_inconsistent_policies_are_refused() -> None:
    with pytest.raises(PolicyError, match="listed twice"):
        Policy((agent("h1"), agent("h1")))
    with pytest.raises(PolicyError, match="belongs to both"):
        Policy((service("a", reads=("roost.host.>",), group="g"), service("b", reads=("roost.alarm.>",), group="g")))
    with pytest.raises(PolicyError, match="sent"):
        Principal("x", PrincipalKind.SERVICE, publishes=("roost.cmd.host.lock",))
    with pytest.raises(PolicyError, match=r"only roost\.cmd"):
        operator("x", sends=("roost.host.>",))
    with pytest.raises(PolicyError, match="not under roost"):
        service("x", reads=("other.>",))
    with pytest.raises(PolicyError, match="bad principal name"):
        operator("Bad Name")
    with pytest.raises(PolicyError):
        Consumer("Bad", "roost.host.>")


def test_a_consumer_spanning_domains_cannot_be_a_jetstream_consumer() -> None:
    policy = Policy((service("watcher", reads=("roost.*.state_changed",)),))
    with pytest.raises(PolicyError, match="spans several domains"):
        nats_permissions(policy)
    rabbitmq_permissions(policy)       # RabbitMQ binds it as it is


@pytest.mark.parametrize("password", ["", " lead", "trail ", "new\nline", "tab\tin", "$2b$10$abcdefghijklmnopqrstu"])
def test_passwords_a_broker_would_mangle_are_refused(password: str) -> None:
    with pytest.raises(PolicyError) as info:
        check_password("agent-h1", password)
    assert password.strip() == "" or password not in str(info.value)


# -- rendering -----------------------------------------------------------------------------------------


def test_nats_config_has_every_user_and_no_empty_allow_list() -> None:
    policy = roost_policy(["h1", "h2"])
    passwords = {n: SecretStr(f"pw-{n}-0123456789") for n in policy.names}
    text = render_nats_config(policy, passwords)
    for name in policy.names:
        assert f'user: "{name}"' in text
        assert f'"pw-{name}-0123456789"' in text
    assert "allow: []" not in text
    assert text.count("{") == text.count("}")


def test_nats_config_quotes_passwords_as_json_strings() -> None:
    text = render_nats_authorization(nats_permissions(Policy((agent("h1"),))), {"agent-h1": 'a"b\\c$d{e}#f'})
    assert 'password: "a\\"b\\\\c$d{e}#f"' in text


def test_nats_config_with_a_hasher_holds_no_password() -> None:
    policy = Policy((agent("h1"),))
    text = render_nats_config(policy, {"agent-h1": "clear-password-1"},
                              hasher=lambda pw: "$2b$04$" + "x" * 53)
    assert "clear-password-1" not in text and "$2b$04$" in text
    with pytest.raises(PolicyError, match="bcrypt"):
        render_nats_config(policy, {"agent-h1": "clear-password-1"}, hasher=lambda pw: pw[::-1])


def test_a_missing_password_is_an_error_naming_the_user() -> None:
    with pytest.raises(PolicyError, match="no password for agent-h1"):
        render_nats_config(Policy((agent("h1"),)), {})


def test_inbox_prefix_is_the_private_one_the_user_may_subscribe() -> None:
    for perm in nats_permissions(roost_policy(["h1"])):
        assert perm.inbox_prefix == nats_inbox_prefix(perm.user)
        assert nats_allows(perm.subscribe, perm.inbox_prefix + ".AbCdEf.1")


def test_rabbitmq_operations_narrow_routing_keys_before_granting_write() -> None:
    policy = roost_policy(["h1"])
    ops = rabbitmq_operations(rabbitmq_permissions(policy), {n: f"pw-{n}-secret" for n in policy.names})
    for name in policy.names:
        mine = [op for op in ops if op.user == name]
        kinds = [type(op) for op in mine]
        assert kinds == [AddUser, SetUserTags, SetTopicPermissions, SetTopicPermissions, SetPermissions]
        assert {op.exchange for op in mine if isinstance(op, SetTopicPermissions)} == {EVENTS_EXCHANGE,
                                                                                       COMMANDS_EXCHANGE}


def test_rabbitmq_operations_never_show_a_password() -> None:
    policy = Policy((agent("h1"), operator()))
    passwords = {"agent-h1": "agent-secret-42", "roost-cli": "cli-secret-42"}
    ops = rabbitmq_operations(rabbitmq_permissions(policy), passwords)
    shown = " ".join([repr(op) for op in ops] + [str(op) for op in ops] + [rabbitmq_script(ops)]
                     + [" ".join(op.args()) for op in ops])
    assert "agent-secret-42" not in shown and "cli-secret-42" not in shown
    add = next(op for op in ops if isinstance(op, AddUser))
    assert add.args() == ("add_user", "agent-h1") and add.args(exists=True) == ("change_password", "agent-h1")
    assert add.stdin() == b"agent-secret-42\n"


def test_rabbitmq_regexes_survive_a_shell_double_quote_reparse() -> None:
    # Debian's rabbitmqctl wrapper (as root) re-parses arguments inside double quotes: no $name,
    # no backquote, no backslash before $ ` " \ in what we pass.
    policy = roost_policy(["h1"])
    for op in rabbitmq_operations(rabbitmq_permissions(policy), {n: "x-password-1" for n in policy.names}):
        for arg in op.args():
            assert "`" not in arg and '"' not in arg
            assert not re.search(r"\$[^)|]", arg.rstrip("$")), arg
            assert not re.search(r"\\[$`\"\\]", arg), arg


def test_queue_regexes_name_the_transports_queues() -> None:
    consumer = Consumer("inventory", "roost.cmd.host.>")
    rabbit = rabbitmq_permissions(Policy((service("inventory", serves=("host",)),)))[0]
    queue = durable_name("inventory", "roost.cmd.host.>")
    assert consumer.durable == queue
    for name in (queue, retry_queue_name(queue, 0.1), "roost.reply." + "ab" * 16, "roost.unrouted.notify." + "0" * 32):
        assert rabbit_allows(rabbit.configure, name), name
        assert rabbit_allows(rabbit.read, name), name
    for name in ("inventory__x__y", queue + "x", "roost.reply.xyz", "roost.unrouted.notify.x"):
        assert not rabbit_allows(rabbit.configure, name), name


def test_shared_inboxes_are_an_explicit_weaker_mode() -> None:
    policy = roost_policy(["h1"])
    shared = {p.user: p for p in nats_permissions(policy, private_inboxes=False)}
    assert shared["roost-cli"].subscribe == ("_INBOX.>",)
    assert nats_allows(shared["agent-h1"].publish, "_INBOX.AbC.1")
    assert not nats_allows(shared["roost-cli"].publish, "_INBOX.AbC.1")       # it serves no command
    assert nats_allows(shared["agent-h1"].subscribe, "_INBOX.AbC.1")


# -- subcloud sync agents: their own sync commands, nothing else ---------------------------------------

subclouds = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z")


@settings(max_examples=200)
@given(s1=subclouds, s2=subclouds, tail=tails)
def test_a_dcagent_publishes_only_its_own_heartbeats(s1: str, s2: str, tail: str) -> None:
    assume(s1 != s2)
    policy = roost_policy(["h1"], subclouds=[s1, s2])
    me = dcagent_user(s1)
    nats = {p.user: p for p in nats_permissions(policy)}[me]
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}[me]
    events_write, _ = topic(rabbit, EVENTS_EXCHANGE)
    commands_write, _ = topic(rabbit, COMMANDS_EXCHANGE)
    for subject in (f"roost.dcagent.{s2}.{tail}", f"roost.cmd.{tail}", f"roost.cmd.sync.{s2}.{tail}",
                    f"roost.cmd.sync.{s1}.{tail}", f"roost.subcloud.{tail}", f"roost.sync.{tail}",
                    f"roost.agent.h1.{tail}", f"roost.dlq.{dcagent_user(s2)}"):
        assert not nats_allows(nats.publish, subject), subject
        assert not rabbit_allows(events_write, subject), subject
        assert not rabbit_allows(commands_write, subject), subject
    assert commands_write == DENY_ROUTING_KEY
    assert not rabbit_allows(rabbit.write, COMMANDS_EXCHANGE)
    own = f"roost.dcagent.{s1}.{tail}"
    assert nats_allows(nats.publish, own) and rabbit_allows(events_write, own)
    assert nats_allows(nats.publish, f"roost.dlq.{me}")


@settings(max_examples=200)
@given(s1=subclouds, s2=subclouds, tail=tails)
def test_a_dcagent_consumes_only_its_own_sync_commands(s1: str, s2: str, tail: str) -> None:
    assume(s1 != s2)
    policy = roost_policy(["h1"], subclouds=[s1, s2])
    me, other = dcagent(s1), dcagent(s2)
    assert me.groups == (f"dcagent-{s1}",) and me.consumes[0].pattern == f"roost.cmd.sync.{s1}.>"
    nats = {p.user: p for p in nats_permissions(policy)}[me.name]
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}[me.name]

    assert not any(s.startswith("roost") for s in nats.subscribe)
    own_durable = me.consumes[0].durable
    creates = [e for e in nats.publish if e.startswith("$JS.API.CONSUMER.CREATE.")]
    assert creates == [f"$JS.API.CONSUMER.CREATE.ROOST_CMD.{own_durable}.roost.cmd.sync.{s1}.>"]
    for entry in nats.publish:
        if entry.startswith(("$JS.API.CONSUMER.", "$JS.ACK.")):
            assert own_durable in entry, entry
        assert other.consumes[0].durable not in entry
        assert not entry.startswith("$JS.API.STREAM.CREATE")
    assert not nats_allows(nats.subscribe, f"_INBOX.{dcagent_user(s2)}.{tail}")
    assert not nats_allows(nats.subscribe, f"_INBOX.dcsync.{tail}")
    assert nats_allows(nats.subscribe, f"{nats_inbox_prefix(me.name)}.{tail}")

    _, commands_read = topic(rabbit, COMMANDS_EXCHANGE)
    _, events_read = topic(rabbit, EVENTS_EXCHANGE)
    assert rabbit_allows(commands_read, to_amqp_binding(f"roost.cmd.sync.{s1}.>"))
    assert events_read == DENY_ROUTING_KEY
    for binding in (f"roost.cmd.sync.{s2}.{tail}", f"roost.cmd.sync.{s2}.#", "roost.cmd.sync.*.#", "roost.cmd.sync.#",
                    "roost.cmd.#", "#", f"roost.cmd.sync.{s1}", f"roost.cmd.sync.{s1}.#",
                    f"roost.cmd.subcloud.{tail}", f"roost.dcagent.{s2}.#"):
        assert not rabbit_allows(commands_read, binding), binding
    other_queue = other.consumes[0].durable
    for regex in (rabbit.configure, rabbit.write, rabbit.read):
        assert not rabbit_allows(regex, other_queue)
        assert not rabbit_allows(regex, retry_queue_name(other_queue, 1.0))
    assert rabbit_allows(rabbit.read, own_durable)


def test_dcagents_reply_to_the_dcsync_service_and_it_reads_their_heartbeats() -> None:
    policy = roost_policy(subclouds=["edge-1"])
    me = policy.get("dcagent-edge-1")
    assert {p.name for p in policy.senders_to(me)} == {"core", "dcsync", "roost-cli"}
    nats = {p.user: p for p in nats_permissions(policy)}
    assert nats_allows(nats["dcagent-edge-1"].publish, "_INBOX.dcsync.abc.1")
    assert not nats_allows(nats["dcagent-edge-1"].publish, "_INBOX.inventory.abc.1")
    dcsync = nats["dcsync"]
    assert nats_allows(dcsync.publish, "roost.cmd.sync.edge-1.apply")
    assert nats_allows(dcsync.publish, "roost.subcloud.state_changed") and nats_allows(dcsync.publish, "roost.sync.x")
    assert not nats_allows(dcsync.publish, "roost.dcagent.edge-1.heartbeat")
    service_row = policy.get("dcsync")
    # exactly as services/dcsync/service.py subscribes
    assert {(c.group, c.pattern) for c in service_row.consumes} == {("dcsync", "roost.cmd.subcloud.>"),
                                                                    ("dcsync", "roost.dcagent.*.heartbeat")}
    rabbit = {p.user: p for p in rabbitmq_permissions(policy)}["dcsync"]
    _, events_read = topic(rabbit, EVENTS_EXCHANGE)
    commands_write, commands_read = topic(rabbit, COMMANDS_EXCHANGE)
    assert rabbit_allows(events_read, to_amqp_binding("roost.dcagent.*.heartbeat"))
    assert not rabbit_allows(events_read, to_amqp_binding("roost.dcagent.>"))
    assert rabbit_allows(commands_write, "roost.cmd.sync.edge-1.hello")
    assert not rabbit_allows(commands_read, to_amqp_binding("roost.cmd.sync.>"))


def test_a_host_agent_and_a_subcloud_of_the_same_name_are_two_users() -> None:
    policy = roost_policy(["edge-1"], subclouds=["edge-1"])
    assert {"agent-edge-1", "dcagent-edge-1"} <= set(policy.names)
    assert dcagent("a" * 48).groups == ("dcagent-" + "a" * 48,)


@pytest.mark.parametrize("name", ["", "Edge", "edge.1", "-e", "e-", "e_1", "a" * 49])
def test_bad_subcloud_names_are_refused(name: str) -> None:
    with pytest.raises(PolicyError, match="subcloud"):
        dcagent(name)
