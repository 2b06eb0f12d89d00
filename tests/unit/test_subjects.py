"""Pure subject logic: NATS-style patterns must mean the same thing on RabbitMQ's topic exchanges."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.bus.subjects import (
    InvalidSubject,
    backoff,
    check_group,
    check_pattern,
    check_subject,
    domain_of,
    durable_name,
    matches,
    retry_bucket,
    stream_name,
    to_amqp_binding,
)

tokens = st.sampled_from(["roost", "host", "alarm", "a", "b", "c"])
subjects = st.lists(tokens, min_size=1, max_size=5).map(".".join)
pattern_tokens = st.sampled_from(["roost", "host", "a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    head = draw(st.lists(pattern_tokens, min_size=0, max_size=4))
    tail = draw(st.sampled_from([[], [">"], ["*"], ["a"]]))
    parts = head + tail
    return ".".join(parts) if parts else "a"


def amqp_topic_matches(binding: str, routing_key: str) -> bool:
    """RabbitMQ's documented topic semantics: '*' is exactly one word, '#' zero or more words."""
    words = binding.split(".")
    keys = routing_key.split(".")

    def go(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(go(i + 1, k) for k in range(j, len(keys) + 1))
        if j == len(keys):
            return False
        return (words[i] == "*" or words[i] == keys[j]) and go(i + 1, j + 1)

    return go(0, 0)


@given(patterns(), subjects)
def test_a_pattern_matches_the_same_subjects_on_both_brokers(pattern: str, subject: str) -> None:
    assert matches(pattern, subject) == amqp_topic_matches(to_amqp_binding(pattern), subject)


@pytest.mark.parametrize(("pattern", "subject", "expected"), [
    ("roost.host.>", "roost.host.added", True),
    ("roost.host.>", "roost.host", False),
    ("roost.*.added", "roost.host.added", True),
    ("roost.*.added", "roost.host.x.added", False),
    ("roost.host.added", "roost.host.added", True),
    (">", "anything.at.all", True),
])
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


def test_bad_names_are_refused_with_a_reason() -> None:
    for bad in ["", "a..b", "a.b c", "a.>.b"]:
        with pytest.raises(InvalidSubject):
            check_subject(bad) if ">" not in bad else check_pattern(bad)
    with pytest.raises(InvalidSubject, match="consumer group"):
        check_group("Bad Group")


@given(st.lists(st.sampled_from(["a", "*", "b", "host"]), min_size=1, max_size=4).map(".".join),
       st.lists(st.sampled_from(["a", "*", "b", "host"]), min_size=1, max_size=4).map(".".join))
def test_durable_names_are_broker_safe_and_distinct(p1: str, p2: str) -> None:
    n1, n2 = durable_name("grp", p1), durable_name("grp", p2)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", n1)
    assert (n1 == n2) == (p1 == p2)


def test_domains_and_streams() -> None:
    assert domain_of("roost.host.state_changed") == "host"
    assert stream_name(domain_of("roost.cmd.host.lock")) == "ROOST_CMD"
    with pytest.raises(InvalidSubject):
        domain_of("roost.>")


def test_retry_buckets_round_up_and_backoff_grows_to_a_cap() -> None:
    assert retry_bucket(0.05) == 0.1
    assert retry_bucket(2) == 5.0
    assert retry_bucket(10_000) == 1800.0
    assert [backoff(a) for a in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert backoff(50) == 60.0


def test_the_transports_route_index_answers_as_matching_every_filter_would() -> None:
    """NatsTransport's consumer filters, indexed by their literal leading tokens, answer exactly as matching a
    subject against every filter (400 random filter sets and subjects)."""
    import random

    from services.core.bus.nats import _Routes

    rng = random.Random(7)
    words = ["roost", "cmd", "sync", "a", "b", "host", "lock"]
    for _ in range(400):
        filters = [".".join(rng.choice([*words, "*"]) for _ in range(rng.randint(1, 5)))
                   + rng.choice(["", ".>"]) for _ in range(rng.randint(0, 8))]
        routes = _Routes(0.0, filters)
        for _ in range(10):
            subject = ".".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            assert routes.takes(subject) == any(matches(f, subject) for f in filters), (filters, subject)
            assert routes.takes(subject) == any(matches(f, subject) for f in filters)     # the answer kept


_OLD_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def token_by_token(subject: str) -> bool:
    """The rule ``check_subject`` states: dot-separated tokens of letters, digits, ``_`` and ``-``, 255 at most."""
    return len(subject) <= 255 and all(_OLD_TOKEN.fullmatch(t) for t in subject.split("."))


@given(st.text(st.sampled_from("ab_-.9Z \n>*é"), max_size=12) | st.text(max_size=300))
def test_a_subject_is_accepted_exactly_when_every_token_is(subject: str) -> None:
    try:
        check_subject(subject)
    except InvalidSubject:
        accepted = False
    else:
        accepted = True
    assert accepted == token_by_token(subject)


def test_a_subject_with_a_trailing_line_break_is_refused() -> None:
    with pytest.raises(InvalidSubject):
        check_subject("roost.alarm.raised\n")
