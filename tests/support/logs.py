"""``logs``: every log line of a test, rendered as in production (JSON), at DEBUG; for checks that no
secret reaches a log.  Import it into the test module: ``from tests.support.logs import logs``."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from services.core.logging import configure_logging, reset_logging


@pytest.fixture(name="logs")
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    caplog.set_level(logging.DEBUG)
    try:
        yield out
    finally:
        reset_logging()
