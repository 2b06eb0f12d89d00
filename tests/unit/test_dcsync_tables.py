"""dcsync's sync configuration in the small: ``TableSpec``/``EndpointSpec`` refusing bad configurations,
``resolve`` against reflected columns (primary key first, local-state columns never synced, every problem in
one message), ``agree`` for version skew between the controller and a subcloud, and the order and lanes of
the keystone and glance endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from services.dcsync.tables import (
    GLANCE,
    KEYSTONE,
    MAIN_LANE,
    REVOCATION_LANE,
    ConfigError,
    Endpoint,
    EndpointSpec,
    ResolvedTable,
    Skew,
    TableSpec,
    agree,
    load_tables_file,
    resolve,
)


def keystone_schema() -> dict[str, list[str]]:
    """A reflected keystone-like schema: each configured table with its key, excluded, natural-key columns
    and a few ordinary ones, in a deliberately unsorted order."""
    out: dict[str, list[str]] = {}
    for t in KEYSTONE.tables:
        cols = ["zz_extra", *t.exclude, *t.natural_key, "extra", *t.pk, "aa_extra"]
        out[t.name] = list(dict.fromkeys(cols))
    return out


def one(tables: Sequence[ResolvedTable], name: str) -> ResolvedTable:
    found = [t for t in tables if t.name == name]
    assert len(found) == 1, f"{name} appears {len(found)} times"
    return found[0]


# -- TableSpec / EndpointSpec ----------------------------------------------------------------------------


def test_table_spec_refuses_excluding_a_primary_key_column() -> None:
    with pytest.raises(ConfigError, match="cannot be excluded") as info:
        TableSpec("user", ("id",), frozenset({"id", "last_active_at"}))
    assert "'id'" in str(info.value) and "user" in str(info.value)


def test_table_spec_refuses_excluding_one_column_of_a_composite_key() -> None:
    with pytest.raises(ConfigError, match="cannot be excluded"):
        TableSpec("assignment", ("actor_id", "role_id"), frozenset({"role_id"}))


def test_table_spec_refuses_an_unknown_lane() -> None:
    with pytest.raises(ConfigError, match="unknown lane 'express'"):
        TableSpec("t", ("id",), lane="express")


def test_table_spec_refuses_an_empty_primary_key() -> None:
    with pytest.raises(ConfigError, match="primary key"):
        TableSpec("t", ())


def test_table_spec_accepts_both_known_lanes() -> None:
    assert TableSpec("a", ("id",), lane=MAIN_LANE).lane == "main"
    assert TableSpec("b", ("id",), lane=REVOCATION_LANE).lane == "revocation"


def test_endpoint_spec_refuses_a_table_listed_twice() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        EndpointSpec(Endpoint.IDENTITY, (TableSpec("user", ("id",)), TableSpec("role", ("id",)),
                                         TableSpec("user", ("id",), frozenset({"x"}))))


def test_endpoint_spec_finds_its_tables_by_name_and_refuses_others() -> None:
    assert KEYSTONE.table("local_user").exclude == frozenset({"failed_auth_count", "failed_auth_at"})
    assert KEYSTONE.names[0] == "project"
    with pytest.raises(ConfigError, match="'images'"):
        KEYSTONE.table("images")


# -- the shipped endpoints ---------------------------------------------------------------------------------


def test_keystone_lists_parents_before_children() -> None:
    pos = {name: i for i, name in enumerate(KEYSTONE.names)}
    assert len(pos) == len(KEYSTONE.tables)
    for parent, child in [("project", "assignment"), ("project", "project_option"), ("project", "project_tag"),
                          ("project", "user"), ("user", "local_user"), ("local_user", "password"),
                          ("user", "user_option"), ("user", "user_group_membership"),
                          ("group", "user_group_membership"), ("role", "assignment"), ("role", "implied_role"),
                          ("role", "role_option")]:
        assert pos[parent] < pos[child], f"{parent} must come before {child}"


def test_keystone_revocation_events_travel_in_their_own_lane_and_nothing_else_does() -> None:
    assert KEYSTONE.table("revocation_event").lane == REVOCATION_LANE
    assert [t.name for t in KEYSTONE.tables if t.lane != MAIN_LANE] == ["revocation_event"]
    assert all(t.lane == MAIN_LANE for t in GLANCE.tables)


def test_keystone_excludes_the_local_state_columns() -> None:
    assert "last_active_at" in KEYSTONE.table("user").exclude
    assert {"failed_auth_count", "failed_auth_at"} <= KEYSTONE.table("local_user").exclude
    assert KEYSTONE.endpoint == Endpoint.IDENTITY and GLANCE.endpoint == Endpoint.IMAGE
    assert GLANCE.names[0] == "images"


# -- resolve -----------------------------------------------------------------------------------------------


def test_resolve_gives_the_primary_key_first_then_the_other_columns_sorted() -> None:
    spec = EndpointSpec(Endpoint.IMAGE, (TableSpec("t", ("id",)),))
    (t,) = resolve(spec, {"t": ["zeta", "id", "alpha", "mid"]})
    assert t.columns == ("id", "alpha", "mid", "zeta")
    assert t.pk == ("id",)


def test_resolve_keeps_the_configured_order_of_a_composite_key() -> None:
    spec = EndpointSpec(Endpoint.IDENTITY, (TableSpec("a", ("role_id", "actor_id"), frozenset({"note"})),))
    (t,) = resolve(spec, {"a": ["note", "actor_id", "b", "role_id", "a"]})
    assert t.columns == ("role_id", "actor_id", "a", "b")
    assert t.excluded == ("note",)


def test_resolve_never_syncs_the_excluded_local_state_columns() -> None:
    resolved = resolve(KEYSTONE, keystone_schema())
    user, local_user = one(resolved, "user"), one(resolved, "local_user")
    assert "last_active_at" not in user.columns and user.excluded == ("last_active_at",)
    assert not {"failed_auth_count", "failed_auth_at"} & set(local_user.columns)
    assert local_user.excluded == ("failed_auth_at", "failed_auth_count")
    assert {"extra", "zz_extra", "aa_extra", "domain_id", "name"} <= set(local_user.columns)


def test_resolve_keeps_the_endpoint_order_lanes_and_natural_keys() -> None:
    resolved = resolve(KEYSTONE, keystone_schema())
    assert tuple(t.name for t in resolved) == KEYSTONE.names
    for spec, t in zip(KEYSTONE.tables, resolved, strict=True):
        assert t.columns[:len(spec.pk)] == spec.pk
        assert t.lane == spec.lane and t.natural_key == spec.natural_key
        assert not set(t.columns) & spec.exclude
        assert len(set(t.columns)) == len(t.columns)


def test_resolve_reports_every_problem_in_one_message() -> None:
    spec = EndpointSpec(Endpoint.IDENTITY, (
        TableSpec("project", ("id",), natural_key=("domain_id", "name")),
        TableSpec("user", ("id",), frozenset({"last_active_at"})),
        TableSpec("gone", ("id",)),
        TableSpec("role", ("id",)),
    ))
    reflected = {"project": ["id", "name"], "user": ["id", "name"], "role": ["name"]}
    with pytest.raises(ConfigError) as info:
        resolve(spec, reflected)
    message = str(info.value)
    assert "identity" in message
    assert "table gone does not exist" in message
    assert "table user has no column last_active_at" in message
    assert "table project has no column domain_id" in message
    assert "table role has no column id" in message
    assert "project has no column name" not in message


def test_resolve_without_problems_returns_every_table() -> None:
    spec = EndpointSpec(Endpoint.IMAGE, (TableSpec("images", ("id",)), TableSpec("image_tags", ("id",))))
    resolved = resolve(spec, {"images": ["id", "name"], "image_tags": ["value", "id"], "other": ["id"]})
    assert [t.name for t in resolved] == ["images", "image_tags"]
    assert one(resolved, "image_tags").columns == ("id", "value")


# -- agree -------------------------------------------------------------------------------------------------


def central_user() -> ResolvedTable:
    spec = EndpointSpec(Endpoint.IDENTITY, (TableSpec("user", ("id",), frozenset({"last_active_at"})),))
    (t,) = resolve(spec, {"user": ["id", "enabled", "extra", "last_active_at", "new_in_central"]})
    return t


def test_agree_syncs_only_the_columns_both_sides_have_and_reports_the_skew() -> None:
    user = central_user()
    agreement = agree([user], {"user": ["id", "enabled", "extra", "last_active_at", "new_in_subcloud"]})
    synced = agreement.table("user")
    assert synced.columns == ("id", "enabled", "extra")
    assert synced.pk == ("id",) and synced.excluded == ("last_active_at",)
    assert agreement.skews == (Skew("user", only_central=("new_in_central",), only_subcloud=("new_in_subcloud",)),)
    assert agreement.missing_tables == ()


def test_agree_does_not_report_an_excluded_column_the_subcloud_has_as_skew() -> None:
    user = central_user()
    agreement = agree([user], {"user": ["id", "enabled", "extra", "new_in_central", "last_active_at"]})
    assert agreement.skews == ()
    assert agreement.table("user").columns == user.columns
    assert "last_active_at" not in agreement.table("user").columns


def test_agree_reports_a_subcloud_missing_an_excluded_column_as_no_skew_either() -> None:
    user = central_user()
    agreement = agree([user], {"user": ["id", "enabled", "extra", "new_in_central"]})
    assert agreement.skews == ()


def test_agree_leaves_out_a_table_the_subcloud_lacks() -> None:
    central = resolve(KEYSTONE, keystone_schema())
    subcloud = keystone_schema()
    del subcloud["project_tag"]
    agreement = agree(central, subcloud)
    assert agreement.missing_tables == ("project_tag",)
    assert "project_tag" not in [t.name for t in agreement.tables]
    assert len(agreement.tables) == len(central) - 1
    with pytest.raises(ConfigError, match="project_tag"):
        agreement.table("project_tag")


def test_agree_leaves_out_a_table_missing_a_primary_key_column_at_the_subcloud() -> None:
    central = resolve(KEYSTONE, keystone_schema())
    subcloud = keystone_schema()
    subcloud["assignment"] = [c for c in subcloud["assignment"] if c != "inherited"]
    agreement = agree(central, subcloud)
    assert agreement.missing_tables == ("assignment",)
    assert "assignment" not in [t.name for t in agreement.tables]
    assert all(s.table != "assignment" for s in agreement.skews)


def test_agree_with_identical_schemas_syncs_everything_unchanged() -> None:
    central = resolve(KEYSTONE, keystone_schema())
    agreement = agree(central, keystone_schema())
    assert agreement.tables == central
    assert agreement.skews == () and agreement.missing_tables == ()


def test_agree_keeps_order_lanes_and_reports_missing_in_endpoint_order() -> None:
    central = resolve(KEYSTONE, keystone_schema())
    subcloud = keystone_schema()
    for name in ("revocation_event", "password", "project"):
        del subcloud[name]
    agreement = agree(central, subcloud)
    assert agreement.missing_tables == ("project", "password", "revocation_event")
    assert [t.name for t in agreement.tables] == [n for n in KEYSTONE.names if n not in agreement.missing_tables]
    for t in agreement.tables:
        assert t.lane == KEYSTONE.table(t.name).lane


def test_agree_skew_keeps_the_primary_key_first() -> None:
    spec = EndpointSpec(Endpoint.IDENTITY, (TableSpec("a", ("type", "actor_id")),))
    (central,) = resolve(spec, {"a": ["type", "actor_id", "b", "c", "d"]})
    agreement = agree([central], {"a": ["d", "b", "actor_id", "type"]})
    assert agreement.table("a").columns == ("type", "actor_id", "b", "d")
    assert agreement.skews == (Skew("a", only_central=("c",)),)


def test_an_operators_tables_file_replaces_one_endpoint(tmp_path: Path) -> None:
    f = tmp_path / "tables.yaml"
    f.write_text("identity:\n  - {table: project, pk: [id], natural_key: [domain_id, name]}\n"
                 "  - {table: user, pk: [id], exclude: [last_active_at, extra]}\n"
                 "  - {table: revocation_event, pk: [id], lane: revocation}\n")
    specs = load_tables_file(f)
    assert specs[Endpoint.IDENTITY].names == ("project", "user", "revocation_event")
    assert specs[Endpoint.IDENTITY].table("user").exclude == frozenset({"last_active_at", "extra"})
    assert specs[Endpoint.IMAGE] is GLANCE


@pytest.mark.parametrize(("text", "says"), [
    ("compute:\n  - {table: x, pk: [id]}\n", "unknown endpoint 'compute'"),
    ("identity: []\n", "non-empty list"),
    ("identity:\n  - {table: user}\n", "needs a primary key"),
    ("identity:\n  - {table: user, pk: [id], columns: [a]}\n", "unknown key(s) ['columns']"),
    ("identity:\n  - {table: user, pk: id}\n", "pk must be a list"),
    ("identity:\n  - {table: user, pk: [id], lane: fast}\n", "unknown lane 'fast'"),
    ("- just a list\n", "expected endpoints"),
])
def test_a_bad_tables_file_says_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "tables.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_tables_file(f)
    assert says in str(caught.value) and str(f) in str(caught.value)
