"""Errors about the user's input or environment: the CLI reports them in one line, without a traceback
(set ``GROUNDKIT_DEBUG=1`` for the traceback). Each also derives from the built-in type callers expect."""

from __future__ import annotations

__all__ = ["GroundkitError", "DataError"]


class GroundkitError(Exception):
    """Base of groundkit's user-facing errors (bad config, bad data file, unusable checkpoint)."""


class DataError(GroundkitError, ValueError):
    """A data file that is missing a key, has the wrong shape or holds invalid values; the message
    names the file, the key and what was expected."""
