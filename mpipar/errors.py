"""MpiparError and the helpers that raise it on every rank of a group at once.

Rule: a check whose outcome may differ between ranks goes through `agree` (one
small collective) so that every rank raises the same error, never a subset of
ranks while the others wait in a collective forever.
"""
from __future__ import annotations


class MpiparError(ValueError):
    """Bad input to an mpipar call; raised on every rank of the group with one message."""


def require(cond: bool, msg: str) -> None:
    """Raise MpiparError(msg) unless cond. Only for checks that are the same on every rank."""
    if not cond:
        raise MpiparError(msg)
