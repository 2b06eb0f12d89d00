"""The audit's comparisons in the small: table roots and bucket digests that differ (an empty root equals a
missing one), the row plan (upsert what is missing or different, delete what came from the controller and is
gone there, report what never came from it), keys compared by value, and a property check over random edits
that applying a plan makes the subcloud agree with the controller."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.dcsync.audit import RowPlan, differing_buckets, differing_tables, plan_rows
from services.dcsync.tracking import Root, RowMark


def mark(pk: dict[str, Any], hash_: int, version: int = 1) -> RowMark:
    return RowMark(pk, hash_, version)


# -- roots and buckets -------------------------------------------------------------------------------------


def test_equal_roots_differ_nowhere() -> None:
    roots = {"project": Root(0x1234, 3), "user": Root(-5, 7), "role": Root(0, 0)}
    assert differing_tables(roots, dict(roots)) == []
    assert differing_tables({}, {}) == []


def test_a_table_with_rows_on_one_side_only_differs_either_way() -> None:
    assert differing_tables({"user": Root(9, 1)}, {}) == ["user"]
    assert differing_tables({}, {"user": Root(9, 1)}) == ["user"]
    assert differing_tables({"user": Root(9, 1)}, {"user": Root(0, 0)}) == ["user"]


def test_an_empty_root_equals_a_missing_one() -> None:
    assert differing_tables({"user": Root(0, 0)}, {}) == []
    assert differing_tables({}, {"password": Root(0, 0)}) == []
    assert differing_buckets({3: Root(0, 0)}, {}) == []


def test_roots_differ_by_digest_or_by_row_count_and_come_back_sorted() -> None:
    central = {"user": Root(7, 2), "role": Root(7, 2), "group": Root(1, 1), "project": Root(4, 4)}
    subcloud = {"user": Root(7, 3), "role": Root(8, 2), "group": Root(1, 1), "project": Root(4, 4)}
    assert differing_tables(central, subcloud) == ["role", "user"]


def test_differing_buckets_compares_digests_and_counts_per_bucket() -> None:
    central = {0: Root(1, 1), 5: Root(2, 2), 9: Root(3, 1), 12: Root(4, 1)}
    subcloud = {0: Root(1, 1), 5: Root(2, 3), 7: Root(6, 1), 12: Root(5, 1)}
    assert differing_buckets(central, subcloud) == [5, 7, 9, 12]


def test_identical_rows_need_nothing() -> None:
    rows = [mark({"id": "a"}, 1, 3), mark({"id": "b"}, 2, 4)]
    plan = plan_rows(rows, list(reversed(rows)))
    assert plan.empty and plan == RowPlan()


def test_a_row_missing_at_the_subcloud_is_upserted() -> None:
    plan = plan_rows([mark({"id": "a"}, 1), mark({"id": "b"}, 2)], [mark({"id": "a"}, 1)])
    assert plan.upsert == [{"id": "b"}]
    assert plan.delete == [] and plan.local_only == []
    assert not plan.empty


def test_a_row_whose_hash_differs_is_upserted() -> None:
    plan = plan_rows([mark({"id": "a"}, 1, 5)], [mark({"id": "a"}, 2, 5)])
    assert (plan.upsert, plan.delete, plan.local_only) == ([{"id": "a"}], [], [])


def test_a_local_row_with_a_central_key_but_other_content_is_upserted_not_reported() -> None:
    plan = plan_rows([mark({"id": "a"}, 1, 5)], [mark({"id": "a"}, 2, 0)])
    assert (plan.upsert, plan.delete, plan.local_only) == ([{"id": "a"}], [], [])


def test_a_row_only_at_the_subcloud_that_came_from_the_controller_is_deleted() -> None:
    plan = plan_rows([], [mark({"id": "gone"}, 1, 17)])
    assert (plan.upsert, plan.delete, plan.local_only) == ([], [{"id": "gone"}], [])


def test_a_row_only_at_the_subcloud_that_never_came_from_the_controller_is_local_only() -> None:
    plan = plan_rows([], [mark({"id": "mine"}, 1, 0)])
    assert (plan.upsert, plan.delete, plan.local_only) == ([], [], [{"id": "mine"}])
    assert not plan.empty


def test_keys_are_compared_by_value_whatever_the_order_of_their_columns() -> None:
    central = [mark({"type": "UserProject", "actor_id": "u", "target_id": "p", "role_id": "r", "inherited": False}, 9)]
    subcloud = [mark({"inherited": False, "role_id": "r", "target_id": "p", "actor_id": "u", "type": "UserProject"}, 9)]
    assert plan_rows(central, subcloud).empty
    changed = [mark({"role_id": "r", "inherited": False, "actor_id": "u", "type": "UserProject", "target_id": "p"}, 8)]
    plan = plan_rows(central, changed)
    assert plan.upsert == [central[0].pk] and plan.delete == [] and plan.local_only == []


def test_keys_differing_in_a_value_are_different_rows() -> None:
    plan = plan_rows([mark({"project_id": "p", "name": "a"}, 1)], [mark({"name": "b", "project_id": "p"}, 1, 2)])
    assert plan.upsert == [{"project_id": "p", "name": "a"}]
    assert plan.delete == [{"name": "b", "project_id": "p"}]


def test_upserts_carry_the_central_key_and_follow_the_central_order() -> None:
    central = [mark({"id": i}, i + 100) for i in (5, 1, 3)]
    plan = plan_rows(central, [mark({"id": 1}, 101)])
    assert plan.upsert == [{"id": 5}, {"id": 3}]


def test_plan_rows_accepts_iterators() -> None:
    plan = plan_rows(iter([mark({"id": 1}, 1)]), (m for m in [mark({"id": 2}, 2, 3), mark({"id": 3}, 3, 0)]))
    assert (plan.upsert, plan.delete, plan.local_only) == ([{"id": 1}], [{"id": 2}], [{"id": 3}])


# -- property: applying a plan converges -------------------------------------------------------------------


def key_of(pk: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(pk.items()))


def shuffled(pk: dict[str, Any], rnd: random.Random) -> dict[str, Any]:
    items = list(pk.items())
    rnd.shuffle(items)
    return dict(items)


def random_pk(rnd: random.Random, composite: bool) -> dict[str, Any]:
    if composite:
        return {"project_id": f"p{rnd.randrange(8)}", "name": f"n{rnd.randrange(40)}", "inherited": rnd.random() < 0.5}
    return {"id": rnd.randrange(200)}


# (pk, hash, version) by key
Rows = dict[tuple[tuple[str, Any], ...], tuple[dict[str, Any], int, int]]


def random_case(rnd: random.Random) -> tuple[Rows, Rows]:
    composite = rnd.random() < 0.5
    central: Rows = {}
    for _ in range(rnd.randrange(0, 40)):
        pk = random_pk(rnd, composite)
        central[key_of(pk)] = (pk, rnd.getrandbits(63) - 2**62, rnd.randrange(1, 1000))
    edits = rnd.choice([0.0, 0.05, 0.3])                                # in sync, a little off, far off
    subcloud: Rows = {}
    for k, (pk, h, v) in central.items():
        roll = rnd.random()
        if roll < edits / 2:
            continue                                                    # dropped at the subcloud
        if roll < edits:
            h ^= rnd.randrange(1, 2**40)                                # changed at the subcloud
        version = v if rnd.random() < 0.9 else 0                       # some arrived as the subcloud's own
        subcloud[k] = (shuffled(pk, rnd), h, version)
    for _ in range(rnd.randrange(0, 6) if rnd.random() < 0.6 else 0):
        pk = random_pk(rnd, composite)
        if key_of(pk) in central or key_of(pk) in subcloud:
            continue
        version = 0 if rnd.random() < 0.5 else rnd.randrange(1, 1000)  # local row, or stale master row
        subcloud[key_of(pk)] = (shuffled(pk, rnd), rnd.getrandbits(63) - 2**62, version)
    return central, subcloud


def plan_for(central: Rows, subcloud: Rows, rnd: random.Random) -> RowPlan:
    c_marks = [RowMark(pk, h, v) for pk, h, v in central.values()]
    s_marks = [RowMark(pk, h, v) for pk, h, v in subcloud.values()]
    rnd.shuffle(c_marks)
    rnd.shuffle(s_marks)
    return plan_rows(c_marks, s_marks)


def apply(plan: RowPlan, central: Rows, subcloud: Rows) -> Rows:
    out = dict(subcloud)
    for pk in plan.delete:
        del out[key_of(pk)]
    for pk in plan.upsert:
        c_pk, h, v = central[key_of(pk)]
        out[key_of(pk)] = (c_pk, h, v)
    return out


def hashes(rows: Rows) -> dict[tuple[tuple[str, Any], ...], int]:
    return {k: h for k, (_, h, _) in rows.items()}


@pytest.mark.parametrize("seed", range(4))
def test_applying_a_plan_makes_the_subcloud_agree_with_the_controller(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(100):
        central, subcloud = random_case(rnd)
        plan = plan_for(central, subcloud, rnd)

        upserts = [key_of(pk) for pk in plan.upsert]
        deletes = [key_of(pk) for pk in plan.delete]
        local = [key_of(pk) for pk in plan.local_only]
        assert len(set(upserts)) == len(upserts) and len(set(deletes)) == len(deletes)
        assert len(set(local)) == len(local)
        assert set(upserts) <= set(central)
        assert not (set(deletes) | set(local)) & set(central)
        assert set(deletes) | set(local) == set(subcloud) - set(central)
        assert all(subcloud[k][2] > 0 for k in deletes) and all(subcloud[k][2] == 0 for k in local)
        assert set(upserts) == {k for k in central if k not in subcloud or subcloud[k][1] != central[k][1]}

        local_rows = {k: subcloud[k] for k in local}
        after = apply(plan, central, subcloud)
        assert hashes(after) == hashes(central) | hashes(local_rows)

        agrees_apart_from_local = hashes(subcloud) == hashes(central) | hashes(local_rows)
        assert (not plan.upsert and not plan.delete) == agrees_apart_from_local
        assert plan.empty == (hashes(subcloud) == hashes(central))

        again = plan_for(central, after, rnd)                           # converged: only local rows remain
        assert again.upsert == [] and again.delete == []
        assert sorted(map(key_of, again.local_only)) == sorted(local)


def test_the_property_cases_cover_every_kind_of_edit() -> None:
    rnd = random.Random(1234)
    seen = {"upsert": 0, "delete": 0, "local_only": 0, "empty": 0}
    for _ in range(300):
        plan = plan_for(*random_case(rnd), rnd)
        seen["upsert"] += bool(plan.upsert)
        seen["delete"] += bool(plan.delete)
        seen["local_only"] += bool(plan.local_only)
        seen["empty"] += plan.empty
    assert all(n >= 5 for n in seen.values()), seen
