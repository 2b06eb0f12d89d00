"""The refusals of the dcsync service (each a ``Reject``: the bus answers ``rejected`` with the reason; the
REST API maps them to 404 / 409 / 503)."""

from __future__ import annotations

from services.core.bus.bus import Reject


class NotFound(Reject):
    """No subcloud of that name."""


class Conflict(Reject):
    """The subcloud's state does not allow it (it exists already; deleting one that is still managed)."""


class Unavailable(Reject):
    """The subcloud's agent did not answer."""
