"""The audit's comparisons: table roots, then bucket digests, then the rows of differing buckets.  Pure.

The central copy wins: a row missing or different at the subcloud is upserted; a row the subcloud has
with a version (it came from the controller) and the controller no longer has is deleted; a row the
subcloud has that never came from the controller (version 0) is *local-only*: reported, and deleted only
when the policy says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.dcsync.tracking import RowMark


class Digestish(Protocol):
    @property
    def digest(self) -> int: ...

    @property
    def rows(self) -> int: ...


def _same(a: Digestish | None, b: Digestish | None) -> bool:
    a_d, a_n = (a.digest, a.rows) if a is not None else (0, 0)
    b_d, b_n = (b.digest, b.rows) if b is not None else (0, 0)
    return a_d == b_d and a_n == b_n


def differing_tables(central: Mapping[str, Digestish], subcloud: Mapping[str, Digestish]) -> list[str]:
    return sorted(t for t in set(central) | set(subcloud) if not _same(central.get(t), subcloud.get(t)))


def differing_buckets(central: Mapping[int, Digestish], subcloud: Mapping[int, Digestish]) -> list[int]:
    return sorted(b for b in set(central) | set(subcloud) if not _same(central.get(b), subcloud.get(b)))


@dataclass(slots=True)
class RowPlan:
    """What one table's differing buckets need."""

    upsert: list[dict[str, Any]] = field(default_factory=list)      # keys whose central row must be sent
    delete: list[dict[str, Any]] = field(default_factory=list)      # came from the controller, gone there
    local_only: list[dict[str, Any]] = field(default_factory=list)  # never came from the controller

    @property
    def empty(self) -> bool:
        return not (self.upsert or self.delete or self.local_only)


def plan_rows(central: Iterable[RowMark], subcloud: Iterable[RowMark]) -> RowPlan:
    theirs = {m.key: m for m in subcloud}
    plan = RowPlan()
    for mine in central:
        other = theirs.pop(mine.key, None)
        if other is None or other.hash != mine.hash:
            plan.upsert.append(mine.pk)
    for other in theirs.values():
        (plan.delete if other.version > 0 else plan.local_only).append(other.pk)
    return plan
