"""Every schema module that registers messages, and the one way to get the whole contract.

A domain adds its messages in ``schemas/<domain>.py`` (registering into ``REGISTRY`` when imported) and
lists that module in ``SCHEMA_MODULES`` below; the AsyncAPI document, the drift test and every service
then see them.  ``load()`` is cheap and safe to call any number of times: a module is imported (and so
registers its messages) once per process.
"""

from __future__ import annotations

import importlib

from schemas.registry import REGISTRY, Registry

SCHEMA_MODULES: tuple[str, ...] = (
    "schemas.core",
    "schemas.alarms",
    "schemas.inventory",
    "schemas.heartbeat",
    "schemas.orchestrator",
    "schemas.dcsync",
)


def load() -> Registry:
    """The registry with every domain's messages in it."""
    for name in SCHEMA_MODULES:
        importlib.import_module(name)
    return REGISTRY
