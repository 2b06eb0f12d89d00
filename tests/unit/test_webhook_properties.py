"""Properties: any body signed with any set of secrets verifies with each of them and with no other;
any change of the body breaks it; the entity prefix matches exactly the whole-segment extensions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.alarms.webhooks.signing import WebhookVerificationError, generate_secret, sign_headers, verify
from services.alarms.webhooks.store import entity_matches

SEGMENT = st.from_regex(r"[a-z]{1,6}=[a-z0-9\-]{1,8}", fullmatch=True)
SECRETS = [generate_secret() for _ in range(4)]


@given(body=st.binary(max_size=512), used=st.sets(st.integers(0, 3), min_size=1),
       ts=st.integers(1_000_000_000, 4_000_000_000), msg=st.from_regex(r"msg_[A-Za-z0-9]{1,20}", fullmatch=True))
def test_sign_verify(body: bytes, used: set[int], ts: int, msg: str) -> None:
    headers = sign_headers([SECRETS[i] for i in sorted(used)], msg, ts, body)
    for i, secret in enumerate(SECRETS):
        if i in used:
            assert verify(headers, body, secret, now=ts) == msg
        else:
            try:
                verify(headers, body, secret, now=ts)
            except WebhookVerificationError:
                pass
            else:
                raise AssertionError("verified with a secret that did not sign")
    tampered = body + b" " if body else b"x"
    try:
        verify(headers, tampered, [SECRETS[i] for i in used], now=ts)
    except WebhookVerificationError:
        pass
    else:
        raise AssertionError("a changed body verified")


@given(prefix=st.lists(SEGMENT, min_size=1, max_size=3), rest=st.lists(SEGMENT, max_size=3),
       suffix=st.from_regex(r"[a-z0-9\-]{1,3}", fullmatch=True))
def test_entity_prefix(prefix: list[str], rest: list[str], suffix: str) -> None:
    p = ".".join(prefix)
    assert entity_matches(p, ".".join(prefix + rest))
    # extending the last segment's value is another entity (controller-1 vs controller-10)
    assert not entity_matches(p, p + suffix + "".join("." + r for r in rest))
    if len(prefix) > 1:
        assert not entity_matches(p, ".".join(prefix[:-1]))
