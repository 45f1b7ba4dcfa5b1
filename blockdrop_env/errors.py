"""Exceptions raised for bad user input.

Every class derives from :class:`BlockDropError`, itself a :class:`ValueError`, so the CLI can
turn any of them into one line on stderr and exit code 2, and library callers can catch the
standard type.
"""

from __future__ import annotations


class BlockDropError(ValueError):
    """Base class for errors caused by a value, file or setting the user supplied."""


class CheckpointError(BlockDropError):
    """A checkpoint file is missing, unreadable, of an unknown format or of the wrong shape."""


class DatasetError(BlockDropError):
    """A dataset directory or file is missing, empty, unreadable or inconsistent."""


class ConfigError(BlockDropError):
    """An argument or option has an invalid value."""


class TrainingError(BlockDropError):
    """Training produced a non-finite loss, probability or weight and was stopped."""
