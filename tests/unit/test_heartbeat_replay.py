"""Replay protection: the window's edges, boots, and the sender's boot counter and sequence numbers."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.heartbeat.drops import DropReason
from services.heartbeat.model import Path
from services.heartbeat.replay import BootCounter, ReplayGuard, ReplayWindow, SendSequence

EXAMPLES = int(os.environ.get("ROOST_HEARTBEAT_EXAMPLES", "200"))
settings.register_profile("heartbeat", max_examples=EXAMPLES, deadline=None)
PROFILE = settings.get_profile("heartbeat")

BOOT = b"bootid01"


def admit(guard: ReplayGuard, seq: int, boot: int = 1, boot_id: bytes = BOOT, path: Path = Path.MGMT,
          sender: int = 7) -> DropReason | None:
    return guard.admit(sender, path, boot, boot_id, seq)


def test_window_edges() -> None:
    guard = ReplayGuard(window=64)
    assert admit(guard, 100) is None
    assert admit(guard, 100) is DropReason.REPLAYED            # duplicate of the top
    assert admit(guard, 37) is None                            # top - 63: the last slot
    assert admit(guard, 36) is DropReason.REPLAYED             # top - 64: behind the window
    assert admit(guard, 99) is None                            # late, once
    assert admit(guard, 99) is DropReason.REPLAYED
    assert admit(guard, 164) is None                           # a jump of exactly the window
    assert admit(guard, 100) is DropReason.REPLAYED            # now behind it
    assert admit(guard, 101) is None                           # top - 63 again
    assert admit(guard, 0) is DropReason.REPLAYED              # seq 0 is never valid


def test_paths_and_senders_have_their_own_windows() -> None:
    guard = ReplayGuard()
    assert admit(guard, 5) is None
    assert admit(guard, 5, path=Path.OAM) is None
    assert admit(guard, 5, sender=8) is None
    assert admit(guard, 5) is DropReason.REPLAYED


def test_boots() -> None:
    guard = ReplayGuard()
    assert admit(guard, 1000, boot=4) is None
    assert admit(guard, 1, boot=5, boot_id=b"bootid02") is None        # a new boot starts afresh
    assert guard.boot_of(7, Path.MGMT) == 5
    assert admit(guard, 1001, boot=4) is DropReason.STALE_BOOT          # a recording from the last life
    assert admit(guard, 2, boot=5, boot_id=b"clone!!!") is DropReason.BOOT_CLASH
    assert admit(guard, 2, boot=5, boot_id=b"bootid02") is None          # the clash changed nothing
    guard.forget(7)                                                    # the operator's override
    assert guard.boot_of(7, Path.MGMT) is None
    assert admit(guard, 3, boot=5, boot_id=b"clone!!!") is None


def test_boot_counter_is_persisted_before_the_first_send() -> None:
    boot = BootCounter(None)
    assert boot.to_store == 1
    seq = SendSequence(boot)
    with pytest.raises(RuntimeError):
        seq.next()
    with pytest.raises(ValueError):
        boot.persisted(0)
    boot.persisted(1)
    assert boot.may_send and [seq.next(), seq.next()] == [1, 2]
    again = BootCounter(boot.to_store)
    assert again.to_store == 2 and not again.may_send


@PROFILE
@given(st.lists(st.integers(1, 300), max_size=200), st.integers(1, 130))
def test_window_accepts_each_seq_at_most_once_and_never_behind(seqs: list[int], size: int) -> None:
    window = ReplayWindow(size)
    accepted: set[int] = set()
    for s in seqs:
        top_before = window.top
        if window.admits(s):
            assert s not in accepted and s > top_before - size
            window.accept(s)
            accepted.add(s)
        else:
            assert s in accepted or s <= top_before - size
        assert window.bitmap < 1 << size
