"""Which tables and columns sync, checked against the schema reflected from a database.  Pure.

An *endpoint* is one source database at the system controller (``identity``: keystone's, ``image``:
glance's) with its tables listed parents first, so that applying rows in list order keeps foreign keys
(deletes go children first).  Each table names:

* its primary key (rows are identified by it everywhere: ids are preserved, never rewritten);
* ``exclude``: local-state columns that never sync and are not hashed (``user.last_active_at``,
  ``local_user.failed_auth_count``, ...), so a subcloud's own bookkeeping survives;
* ``lane``: ``revocation`` for revocation events, which depend on nothing and travel ahead of the rest;
* ``natural_key``: the columns a joining subcloud's own row may share with a central row of another id
  (``project (domain_id, name)``); what happens to such a row is the join policy.

``resolve`` checks a configuration against the columns a database really has (a configured table or
excluded column that does not exist is an error, said plainly) and gives the columns that sync.
``agree`` is the version-skew rule: a subcloud whose keystone has other columns syncs the columns both
sides have; the rest is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class ConfigError(ValueError):
    """The sync configuration does not fit the database (or itself)."""


class Endpoint(StrEnum):
    IDENTITY = "identity"
    IMAGE = "image"


MAIN_LANE = "main"
REVOCATION_LANE = "revocation"
LANES = (MAIN_LANE, REVOCATION_LANE)


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    pk: tuple[str, ...]
    exclude: frozenset[str] = frozenset()
    lane: str = MAIN_LANE
    natural_key: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.pk:
            raise ConfigError(f"table {self.name}: a synced table needs a primary key")
        if self.lane not in LANES:
            raise ConfigError(f"table {self.name}: unknown lane {self.lane!r} (one of {', '.join(LANES)})")
        if clash := set(self.pk) & self.exclude:
            raise ConfigError(f"table {self.name}: primary key column(s) {sorted(clash)} cannot be excluded")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    endpoint: Endpoint
    tables: tuple[TableSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ConfigError(f"endpoint {self.endpoint}: a table is listed twice")

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise ConfigError(f"endpoint {self.endpoint} does not sync table {name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)


def _t(name: str, *pk: str, exclude: Iterable[str] = (), lane: str = MAIN_LANE,
       natural_key: Sequence[str] = ()) -> TableSpec:
    return TableSpec(name, tuple(pk), frozenset(exclude), lane, tuple(natural_key))


# keystone: parents first (a domain is a project row with is_domain).
KEYSTONE = EndpointSpec(Endpoint.IDENTITY, (
    _t("project", "id", natural_key=("domain_id", "name")),
    _t("project_option", "project_id", "option_id"),
    _t("project_tag", "project_id", "name"),
    _t("user", "id", exclude=("last_active_at",)),
    _t("user_option", "user_id", "option_id"),
    _t("local_user", "id", exclude=("failed_auth_count", "failed_auth_at"), natural_key=("domain_id", "name")),
    _t("password", "id"),
    _t("group", "id", natural_key=("domain_id", "name")),
    _t("user_group_membership", "user_id", "group_id"),
    _t("role", "id", natural_key=("name", "domain_id")),
    _t("role_option", "role_id", "option_id"),
    _t("implied_role", "prior_role_id", "implied_role_id"),
    _t("assignment", "type", "actor_id", "target_id", "role_id", "inherited"),
    _t("system_assignment", "type", "actor_id", "target_id", "role_id", "inherited"),
    _t("revocation_event", "id", lane=REVOCATION_LANE),
))

GLANCE = EndpointSpec(Endpoint.IMAGE, (
    _t("images", "id"),
    _t("image_properties", "id"),
    _t("image_locations", "id"),
    _t("image_members", "id"),
    _t("image_tags", "id"),
))

DEFAULT_ENDPOINTS: Mapping[Endpoint, EndpointSpec] = {Endpoint.IDENTITY: KEYSTONE, Endpoint.IMAGE: GLANCE}


@dataclass(frozen=True, slots=True)
class ResolvedTable:
    """A synced table as it is in one database: the columns that sync (primary key first)."""

    name: str
    pk: tuple[str, ...]
    columns: tuple[str, ...]
    lane: str = MAIN_LANE
    natural_key: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()   # local-state columns the database has and that never sync


def resolve(spec: EndpointSpec, reflected: Mapping[str, Sequence[str]]) -> tuple[ResolvedTable, ...]:
    """The tables of ``spec`` with the columns that sync, given ``reflected`` (table -> its columns, as the
    database has them).  Every problem is reported at once."""
    problems: list[str] = []
    out: list[ResolvedTable] = []
    for t in spec.tables:
        cols = reflected.get(t.name)
        if cols is None:
            problems.append(f"table {t.name} does not exist")
            continue
        have = set(cols)
        for c in (*t.pk, *sorted(t.exclude), *t.natural_key):
            if c not in have:
                problems.append(f"table {t.name} has no column {c}")
        synced = [*t.pk, *sorted(c for c in cols if c not in t.exclude and c not in t.pk)]
        out.append(ResolvedTable(t.name, t.pk, tuple(synced), t.lane, t.natural_key,
                                 tuple(sorted(c for c in t.exclude if c in have))))
    if problems:
        raise ConfigError(f"the {spec.endpoint} sync configuration does not fit the database: " + "; ".join(problems))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Skew:
    """Columns one side has and the other has not, for one table."""

    table: str
    only_central: tuple[str, ...] = ()
    only_subcloud: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Agreement:
    """What syncs to one subcloud: the central tables cut to the columns both sides have."""

    tables: tuple[ResolvedTable, ...]
    skews: tuple[Skew, ...] = ()
    missing_tables: tuple[str, ...] = field(default=())

    def table(self, name: str) -> ResolvedTable:
        for t in self.tables:
            if t.name == name:
                return t
        raise ConfigError(f"table {name!r} is not synced to this subcloud")


def agree(central: Sequence[ResolvedTable], subcloud: Mapping[str, Sequence[str]]) -> Agreement:
    """The version-skew rule.  ``subcloud``: table -> columns as the subcloud's database has them.  A table
    the subcloud lacks does not sync (reported); a column only one side has is left out of rows and
    hashes alike (reported), so a skewed pair converges instead of repairing the same rows forever."""
    tables: list[ResolvedTable] = []
    skews: list[Skew] = []
    missing: list[str] = []
    for t in central:
        theirs = subcloud.get(t.name)
        if theirs is None:
            missing.append(t.name)
            continue
        their_set = set(theirs)
        absent_pk = [c for c in t.pk if c not in their_set]
        if absent_pk:
            missing.append(t.name)
            continue
        cols = tuple(c for c in t.columns if c in their_set)
        only_central = tuple(c for c in t.columns if c not in their_set)
        only_subcloud = tuple(sorted(their_set - set(t.columns) - set(t.excluded)))
        if only_central or only_subcloud:
            skews.append(Skew(t.name, only_central, only_subcloud))
        tables.append(ResolvedTable(t.name, t.pk, cols, t.lane, t.natural_key, t.excluded))
    return Agreement(tuple(tables), tuple(skews), tuple(missing))


def load_tables_file(path: Path) -> dict[Endpoint, EndpointSpec]:
    """An operator's sync configuration (``ROOST_DCSYNC_TABLES_FILE``), YAML, per endpoint its tables in
    apply order (parents first)::

        identity:
          - {table: project, pk: [id], natural_key: [domain_id, name]}
          - {table: user, pk: [id], exclude: [last_active_at]}
          - {table: revocation_event, pk: [id], lane: revocation}
        image:
          - {table: images, pk: [id]}

    An endpoint the file names replaces the built-in list for it; one it does not name keeps the built-in
    list.  ``ConfigError`` names the file and what is wrong with it."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the sync configuration {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected endpoints (identity, image) mapping to lists of tables")
    out = dict(DEFAULT_ENDPOINTS)
    for key, items in raw.items():
        try:
            endpoint = Endpoint(str(key))
        except ValueError:
            known = ", ".join(e.value for e in Endpoint)
            raise ConfigError(f"{path}: unknown endpoint {key!r} (one of {known})") from None
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{path}: {endpoint}: expected a non-empty list of tables")
        tables = []
        for i, item in enumerate(items, start=1):
            where = f"{path}: {endpoint} entry {i}"
            if not isinstance(item, dict) or not isinstance(item.get("table"), str):
                raise ConfigError(f"{where}: expected a mapping with 'table'")
            unknown = set(item) - {"table", "pk", "exclude", "lane", "natural_key"}
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
            lists = {}
            for k in ("pk", "exclude", "natural_key"):
                v = item.get(k, [])
                if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                    raise ConfigError(f"{where} ({item['table']}): {k} must be a list of column names")
                lists[k] = v
            try:
                tables.append(TableSpec(item["table"], tuple(lists["pk"]), frozenset(lists["exclude"]),
                                        str(item.get("lane", MAIN_LANE)), tuple(lists["natural_key"])))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        try:
            out[endpoint] = EndpointSpec(endpoint, tuple(tables))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return out
