"""A JetStream delivery's stream, stream sequence and delivery count, read off its ack subject by roost
(``delivery_fields``, per message on every NATS consumer), are what nats-py's ``Msg.metadata`` reads, in
both subject forms; any other form is nats-py's to refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from services.core.bus.nats_consumer import delivery_fields

token = st.text(st.characters(codec="ascii", exclude_characters=". *>\r\n\t"), min_size=1, max_size=12)
number = st.integers(0, 2**63 - 1)


def msg(reply: str) -> Msg:
    return Msg(_client=None, subject="roost.fault.set", reply=reply)  # type: ignore[arg-type]


def nats_py(m: Msg) -> tuple[str, int, int]:
    meta = m.metadata
    return meta.stream, meta.sequence.stream, meta.num_delivered


@settings(max_examples=200, deadline=None)
@given(stream=token, consumer=token, delivered=st.integers(1, 2**31), sseq=number, cseq=number,
       ns=st.integers(0, 2**62), pending=number)
def test_without_a_domain(stream: str, consumer: str, delivered: int, sseq: int, cseq: int, ns: int,
                          pending: int) -> None:
    m = msg(f"$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ns}.{pending}")
    assert delivery_fields(m) == nats_py(m) == (stream, sseq, delivered)


@settings(max_examples=200, deadline=None)
@given(domain=token | st.just("_"), account=token, stream=token, consumer=token, delivered=st.integers(1, 2**31),
       sseq=number, cseq=number, ns=st.integers(0, 2**62), pending=number, extra=st.lists(token, max_size=2))
def test_with_a_domain_and_account(domain: str, account: str, stream: str, consumer: str, delivered: int,
                                   sseq: int, cseq: int, ns: int, pending: int, extra: list[str]) -> None:
    tail = "".join(f".{t}" for t in extra)
    m = msg(f"$JS.ACK.{domain}.{account}.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ns}.{pending}{tail}")
    assert delivery_fields(m) == nats_py(m) == (stream, sseq, delivered)


# no reply, a core NATS inbox, an ack subject of 7 tokens and one of 10
@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def", "$JS.ACK.s.c.1.2.3", "$JS.ACK.d.a.s.c.1.2.3.4"])
def test_not_a_jetstream_ack_subject_is_refused(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        delivery_fields(msg(reply))
