"""Pure subject and pattern logic shared by every transport: no I/O.

Subjects are dot-separated tokens of ``[A-Za-z0-9_-]``.  Patterns use NATS wildcards: ``*`` is one
token, ``>`` (last token only) is one or more tokens.
"""

from __future__ import annotations

import hashlib
import re

from services.core.bus.abc import COMMAND_PREFIX, DLQ_PREFIX

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")    # whole subjects, one match (every message)
_GROUP = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class InvalidSubject(ValueError):
    pass


def check_subject(subject: str) -> str:
    if len(subject) > 255 or _SUBJECT.fullmatch(subject) is None:
        raise InvalidSubject(f"bad subject {subject!r}: dot-separated tokens of letters, digits, _ and -")
    return subject


def check_pattern(pattern: str) -> str:
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1:
            continue
        if token == "*" or _TOKEN.match(token):
            continue
        raise InvalidSubject(f"bad pattern {pattern!r}: tokens, '*' for one token, '>' last for the rest")
    return pattern


def check_group(group: str) -> str:
    if not _GROUP.match(group):
        raise InvalidSubject(f"bad consumer group {group!r}: lower-case letters, digits, _ and -, 1-63 chars")
    return group


def matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches ``pattern`` (NATS semantics)."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        if p != "*" and p != s_tokens[i]:
            return False
    return len(s_tokens) == len(p_tokens)


def to_amqp_binding(pattern: str) -> str:
    """NATS-style pattern to an AMQP topic binding key (``>`` becomes ``#``; AMQP ``#`` also matches
    zero tokens, so ``a.>`` binds as ``a.*.#`` to keep 'one or more')."""
    tokens = pattern.split(".")
    if tokens[-1] == ">":
        tokens = [*tokens[:-1], "*", "#"]
    return ".".join(tokens)


def domain_of(subject_or_pattern: str) -> str:
    """The domain a subject belongs to: its second token (``roost.host.state_changed`` -> ``host``)."""
    tokens = subject_or_pattern.split(".")
    if len(tokens) < 2 or tokens[0] != "roost" or tokens[1] in ("*", ">"):
        raise InvalidSubject(f"{subject_or_pattern!r} is not under roost.<domain>.")
    return tokens[1]


def stream_name(domain: str) -> str:
    """The JetStream stream holding one domain (``host`` -> ``ROOST_HOST``)."""
    return "ROOST_" + domain.upper().replace("-", "_")


def durable_name(group: str, pattern: str) -> str:
    """A stable broker-side name for (group, pattern): queue name on RabbitMQ, durable on NATS.

    Readable for operators and unique: the group, a sanitised pattern, and a short hash of the pattern.
    """
    readable = pattern.replace(".", "_").replace("*", "any").replace(">", "all")
    digest = hashlib.sha256(pattern.encode()).hexdigest()[:8]
    return f"{group}__{readable[:80]}__{digest}"


def dlq_subject(group: str) -> str:
    return f"{DLQ_PREFIX}.{group}"


def is_command(subject: str) -> bool:
    return subject.startswith(COMMAND_PREFIX + ".")


def is_dead_letter(subject: str) -> bool:
    return subject.startswith(DLQ_PREFIX + ".")


# Retry delays are rounded up to one of these buckets (seconds): a broker without a delay plugin
# keeps one TTL queue per bucket.
RETRY_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)


def retry_bucket(delay: float) -> float:
    for bucket in RETRY_BUCKETS:
        if delay <= bucket:
            return bucket
    return RETRY_BUCKETS[-1]


def backoff(attempt: int, *, base: float = 0.2, cap: float = 60.0) -> float:
    """Delay before the next try after ``attempt`` failed deliveries: exponential, capped."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))
