"""Why a datagram was dropped, the counters by reason, and the burst detector behind alarm 950.006.  Pure.

Every datagram that does not count as a heartbeat is dropped with exactly one :class:`DropReason`
(``wire.verify_then_parse`` for what the bytes alone decide, ``replay.ReplayGuard`` for what needs
per-sender state).  :class:`DropCounter` counts them by (path, reason) for the metrics and watches the
*forgery-kind* ones: ``burst_count`` of them within ``burst_window`` seconds on one (host, path) raise
950.006 for ``host=<host>.network=<path>``; ``clear_after`` seconds without any clear it again.  The host
is whom the caller attributes the datagrams to: the known host whose address sent them, else the
receiving host itself.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass

from services.heartbeat.model import ALARM_AUTH_FAILURES, AlarmIntent, Path, Seconds, network_entity


class DropReason(enum.StrEnum):
    OVERSIZE = "oversize"            # longer than wire.MAX_DATAGRAM
    TRUNCATED = "truncated"          # shorter than a header and a MAC, or than its payload length says
    BAD_MAGIC = "bad_magic"          # not a roost heartbeat at all (stray traffic)
    BAD_VERSION = "bad_version"      # a wire version we do not speak
    UNKNOWN_KEY = "unknown_key"      # a key id we do not hold (or 0, no MAC, on a path that requires one)
    RETIRED_KEY = "retired_key"      # a key id we retired after a rotation
    BAD_MAC = "bad_mac"              # the HMAC does not verify: forged or corrupted
    WRONG_CLUSTER = "wrong_cluster"  # authentic, but for another cluster id
    WRONG_PATH = "wrong_path"        # authentic, but says another path than the one it arrived on
    NOT_FOR_US = "not_for_us"        # addressed to another node
    REFLECTED = "reflected"          # claims to come from ourselves: our own datagram sent back
    MALFORMED = "malformed"          # authentic, but a field or the payload does not parse
    REPLAYED = "replayed"            # a sequence number already seen, or behind the window
    STALE_BOOT = "stale_boot"        # from an older boot of the sender than one already seen
    BOOT_CLASH = "boot_clash"        # the same boot counter with another boot id: a reset or cloned counter
    UNKNOWN_SENDER = "unknown_sender"  # authentic, but from a node we do not monitor

    @property
    def forgery(self) -> bool:
        """Whether it counts towards the authentication-failure burst (950.006)."""
        return self not in _BENIGN


# Stray traffic, a multicast copy meant for another node, a node not (yet) in our configuration.
_BENIGN = frozenset({DropReason.BAD_MAGIC, DropReason.NOT_FOR_US, DropReason.UNKNOWN_SENDER})


@dataclass(frozen=True, slots=True)
class BurstPolicy:
    burst_count: int = 10
    burst_window: Seconds = 5.0
    clear_after: Seconds = 60.0


class DropCounter:
    """Counts drops by (path, reason) and turns bursts of forgery-kind drops into 950.006 intents."""

    def __init__(self, policy: BurstPolicy | None = None) -> None:
        self.policy = policy or BurstPolicy()
        self.counts: Counter[tuple[Path, DropReason]] = Counter()
        self._recent: dict[tuple[str, Path], deque[Seconds]] = {}
        self._last: dict[tuple[str, Path], Seconds] = {}
        self._raised: set[tuple[str, Path]] = set()

    def record(self, now: Seconds, host: str, path: Path, reason: DropReason) -> list[AlarmIntent]:
        """Count one drop; the alarm to raise when it completes a burst."""
        self.counts[path, reason] += 1
        if not reason.forgery:
            return []
        key = (host, path)
        self._last[key] = now
        recent = self._recent.setdefault(key, deque())
        recent.append(now)
        while recent and recent[0] <= now - self.policy.burst_window:
            recent.popleft()
        if key in self._raised or len(recent) < self.policy.burst_count:
            return []
        self._raised.add(key)
        return [AlarmIntent(ALARM_AUTH_FAILURES, network_entity(host, path), "major",
                            f"{len(recent)} heartbeat datagrams for {host} on the {path.network} network failed "
                            f"authentication within {self.policy.burst_window:g} s (last: {reason.value})")]

    def tick(self, now: Seconds) -> list[AlarmIntent]:
        """The alarms to clear: bursts followed by ``clear_after`` seconds without a forgery-kind drop."""
        cleared: list[AlarmIntent] = []
        for key in sorted(self._raised, key=lambda k: (k[0], k[1])):
            if now - self._last[key] >= self.policy.clear_after:
                self._raised.discard(key)
                self._recent.pop(key, None)
                cleared.append(AlarmIntent(ALARM_AUTH_FAILURES, network_entity(*key)))
        return cleared

    def next_deadline(self) -> Seconds | None:
        """When :meth:`tick` would next clear something (None: nothing raised)."""
        if not self._raised:
            return None
        return min(self._last[k] for k in self._raised) + self.policy.clear_after

    def raised(self) -> frozenset[tuple[str, Path]]:
        return frozenset(self._raised)
