"""Token helpers and the in-memory authenticator (the PostgreSQL one is tested in integration)."""

from __future__ import annotations

import hashlib

from schemas.envelope import Principal, Role
from services.core import auth


def test_token_shape_and_hash() -> None:
    token = auth.generate_token()
    assert auth.looks_like_token(token)
    assert auth.hash_token(token) == hashlib.sha256(token.encode()).digest()
    for bad in ("", "roost_", "roost_" + "a" * 42, "roost_" + "a" * 44, "ghp_" + "a" * 43, "roost_" + "a" * 42 + "!"):
        assert not auth.looks_like_token(bad)


def test_bearer_token_parsing() -> None:
    assert auth.bearer_token("Bearer abc") == "abc"
    assert auth.bearer_token("bearer   abc ") == "abc"
    assert auth.bearer_token("Basic abc") is None
    assert auth.bearer_token("Bearer") is None
    assert auth.bearer_token(None) is None


async def test_in_memory_authenticator() -> None:
    authn = auth.InMemoryAuthenticator()
    admin = authn.issue("alice", Role.ADMIN)
    agent = authn.issue("compute-0", "reader", kind="agent")
    assert await authn.authenticate(admin) == Principal(name="alice", role=Role.ADMIN)
    assert await authn.authenticate(agent) == Principal(name="compute-0", role=Role.READER, kind="agent")
    assert await authn.authenticate(auth.generate_token()) is None
    assert await authn.authenticate("garbage") is None
    assert authn.revoke("alice") and not authn.revoke("alice")
    assert await authn.authenticate(admin) is None
