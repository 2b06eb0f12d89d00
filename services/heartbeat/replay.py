"""Replay protection: the receiver's sequence window per (sender, path), the sender's boot counter.  Pure.

Receiver (:class:`ReplayGuard`), consulted only for datagrams that passed ``wire.verify_then_parse`` (a
forged datagram can never move this state), per (sender, path) ``(boot_counter, boot_id, top, bitmap)``:

* a boot counter below the stored one: ``STALE_BOOT`` (a recording from an earlier life of the sender);
* a higher one: a new boot; the window starts afresh at this datagram;
* the same counter with another boot id: ``BOOT_CLASH`` (the persisted counter was reset or a host
  cloned): dropped until an operator calls :meth:`ReplayGuard.forget` for that sender;
* then, IPsec/WireGuard-style with a window of ``W`` (64 by default, 6.4 s of reordering at 10 Hz):
  ``seq > top`` is accepted and slides the window; ``top - W < seq <= top`` is accepted once (late or
  reordered); anything older, or seen already, is ``REPLAYED``.

Sender (:class:`BootCounter`, :class:`SendSequence`): the boot counter is the stored value plus one, and
must be persisted (fsync) *before* the first datagram goes out; ``may_send`` says whether it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.heartbeat.drops import DropReason
from services.heartbeat.model import NodeId, Path

DEFAULT_WINDOW = 64


@dataclass(slots=True)
class ReplayWindow:
    """Which of the last ``size`` sequence numbers below and at ``top`` were seen (bit i: ``top - i``)."""

    size: int = DEFAULT_WINDOW
    top: int = 0
    bitmap: int = 0

    def admits(self, seq: int) -> bool:
        if seq <= 0:
            return False
        if seq > self.top:
            return True
        offset = self.top - seq
        return offset < self.size and not self.bitmap >> offset & 1

    def accept(self, seq: int) -> None:
        """Record ``seq`` (which :meth:`admits`)."""
        if seq > self.top:
            shift = seq - self.top
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)


@dataclass(slots=True)
class _SenderPath:
    boot_counter: int
    boot_id: bytes
    window: ReplayWindow


class ReplayGuard:
    """The replay state of every (sender, path) this node receives from."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("the window holds at least one sequence number")
        self.window = window
        self._state: dict[tuple[NodeId, Path], _SenderPath] = {}

    def admit(self, sender: NodeId, path: Path, boot_counter: int, boot_id: bytes, seq: int) -> DropReason | None:
        """None and record it if the datagram is fresh, else why it is dropped (nothing recorded)."""
        state = self._state.get((sender, path))
        if state is None or boot_counter > state.boot_counter:
            window = ReplayWindow(self.window)
            if not window.admits(seq):
                return DropReason.REPLAYED
            window.accept(seq)
            self._state[sender, path] = _SenderPath(boot_counter, boot_id, window)
            return None
        if boot_counter < state.boot_counter:
            return DropReason.STALE_BOOT
        if boot_id != state.boot_id:
            return DropReason.BOOT_CLASH
        if not state.window.admits(seq):
            return DropReason.REPLAYED
        state.window.accept(seq)
        return None

    def boot_of(self, sender: NodeId, path: Path) -> int | None:
        state = self._state.get((sender, path))
        return state.boot_counter if state else None

    def forget(self, sender: NodeId) -> None:
        """Drop what is known of a sender (removed from the site, or an operator cleared a boot clash)."""
        self._state = {k: v for k, v in self._state.items() if k[0] != sender}


class BootCounter:
    """The sender's boot counter: ``stored`` is what was persisted (None: never), ``to_store`` what to persist."""

    def __init__(self, stored: int | None) -> None:
        if stored is not None and stored < 0:
            raise ValueError("a boot counter is not negative")
        self.value = (stored or 0) + 1
        self._persisted = False

    @property
    def to_store(self) -> int:
        return self.value

    def persisted(self, stored: int) -> None:
        """The caller wrote (and fsynced) ``stored``; from now on datagrams may go out."""
        if stored != self.value:
            raise ValueError(f"boot counter {self.value} must be persisted, not {stored}")
        self._persisted = True

    @property
    def may_send(self) -> bool:
        return self._persisted


class SendSequence:
    """Sequence numbers for one path, from 1; refuses to count before the boot counter is persisted."""

    def __init__(self, boot: BootCounter) -> None:
        self.boot = boot
        self.last = 0

    def next(self) -> int:
        if not self.boot.may_send:
            raise RuntimeError("persist the boot counter before the first datagram")
        self.last += 1
        return self.last
