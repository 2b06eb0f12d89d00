"""Text types the contracts share; pure."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def no_nul(value: str) -> str:
    """PostgreSQL's text holds any character but NUL: a message carrying one would fail at the database on every
    attempt until the bus gave it up, so the contract refuses it at once, with the reason."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000), which PostgreSQL's text cannot hold")
    return value


Clean = Annotated[str, AfterValidator(no_nul)]
"""Text stored as it is given: any character but NUL."""
