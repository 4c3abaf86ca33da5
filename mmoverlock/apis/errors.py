"""Errors that the tools report as one clear message instead of a traceback."""
from __future__ import annotations


class UsageError(RuntimeError):
    """Something the user has to fix (a path, a config value); the message says how."""


class ConfigNotFoundError(UsageError, FileNotFoundError):
    """The config file does not exist."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data root, annotation file or image folder named by the config does not exist."""


class CheckpointNotFoundError(UsageError, FileNotFoundError):
    """A checkpoint named on the command line or in the config does not exist."""


class ConfigMismatchError(UsageError, ValueError):
    """Parts of a config do not fit together (widths, class counts, arch names)."""


class CheckpointMismatchError(UsageError, ValueError):
    """A checkpoint does not fit the model built from the config."""
