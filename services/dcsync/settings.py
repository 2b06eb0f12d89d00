"""Settings of dcsync at the system controller: ``ROOST_DCSYNC_*`` environment variables.

The source databases are keystone's (``keystone_url``) and glance's (``glance_url``) at the system
controller; an endpoint whose URL is not set does not sync (and says so at start).  ``fernet_repo`` is
keystone's Fernet key repository there, carried to every subcloud when set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import ConfigError, format_validation_error


class DcsyncSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROOST_DCSYNC_", extra="forbid", frozen=True,
                                      hide_input_in_errors=True)

    keystone_url: str | None = Field(default=None, repr=False, description="keystone's database at the controller")
    keystone_schema: str = Field(default="public", description="the schema keystone's tables are in")
    glance_url: str | None = Field(default=None, repr=False, description="glance's database at the controller")
    glance_schema: str = Field(default="public", description="the schema glance's tables are in")
    tables_file: Path | None = Field(default=None, description="which tables and columns sync (YAML; default: the "
                                     "built-in keystone and glance lists, services/dcsync/tables.py)")
    fernet_repo: Path | None = Field(default=None, description="keystone's Fernet key repository at the controller")
    fernet_check_interval: float = Field(default=30.0, gt=0, description="seconds between looks at the repository")
    audit_interval: float = Field(default=600.0, gt=0, description="seconds between audits of each subcloud")
    redigest_interval: float = Field(default=86400.0, gt=0,
                                     description="seconds between full re-digests of the controller's tables")
    offline_after: float = Field(default=30.0, gt=0, description="a subcloud not heard this long is offline")
    mass_fraction: float = Field(default=0.5, gt=0, le=1,
                                 description="this share of the online subclouds silent at once is a mass outage")
    mass_minimum: int = Field(default=3, ge=2, description="... and at least this many of them")
    mass_hold: float = Field(default=600.0, gt=0, description="seconds a mass outage holds the subclouds online")
    out_of_sync_alarm_after: float = Field(default=300.0, ge=0,
                                           description="seconds out of sync before 950.102 is raised")
    lag_grace: float = Field(default=10.0, ge=0,
                             description="seconds a change may wait for a subcloud (and the subcloud be behind "
                                         "the head) while it still counts as in sync")
    batch_size: int = Field(default=500, ge=1, le=5000, description="changes per sync message")
    concurrency: int = Field(default=256, ge=1, description="sync requests in flight, all subclouds together")
    request_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for a subcloud agent's answer")
    change_retention_days: float = Field(default=7.0, gt=0,
                                         description="changes older than this leave the log (a subcloud further "
                                                     "behind is brought back by an audit)")
    join_policy: Literal["adopt", "refuse"] = Field(
        default="adopt", description="a joining subcloud's row with a central row's natural key but another id: "
                                     "adopt (replace it by the central one) or refuse (the join fails, saying which)")
    local_only: Literal["report", "delete"] = Field(
        default="report", description="rows only a subcloud has, that never came from the controller")
    repair_triggers: bool = Field(default=True,
                                  description="re-create missing capture triggers (and log what they missed)")


def load_dcsync_settings(**overrides: object) -> DcsyncSettings:
    """``ROOST_DCSYNC_*`` with ``overrides`` (None values ignored); ``ConfigError`` naming what is wrong."""
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        return DcsyncSettings(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("ROOST_", "ROOST_DCSYNC_")) from None
